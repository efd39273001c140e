"""StyleSwin (Zhang et al., CVPR 2022): a style-based GAN whose generator is a transformer of
local windows, and whose discriminator sees the image's Haar wavelets at every scale.

Images are ``(B, C, T, H, W)`` with square power-of-two H = W = S; frames are stacked as
channels (C * T) as the NVAE does. Widths follow StyleGAN2's table: at r px the generator has
``width(r) = min(channel_max, channel_base // r)`` channels (StyleSwin at 256 px, channel
multiplier 2: channel_base 32768, channel_max 512 -> 512 channels up to 64 px, 256 at 128,
128 at 256).

Generator ``G``::

    z (B, style_dim) -> mapping: PixelNorm, n_mlp equalised-lr linear layers (lr x 0.01)
    -> style w (B, style_dim), the same for every layer
    learned constant (width(4), 4, 4) -> tokens (B, 16, width(4))
    per resolution r = 4, 8, ..., S: two StyleSwin blocks modulated by w, each
        x + DoubleAttention(AdaIN(x, w)), then x + MLP(AdaIN(x, w));
        a 1x1 to-image convolution to C * T channels, added to the bilinear x2 of the sum
        of the coarser ones (the skip generator of StyleGAN2);
        then (r < S) bilinear x2, LayerNorm, linear to width(2r), + alpha * sin-cos grid
        (alpha learned, from 0)

Double attention: the tokens' queries, keys and values are split in two halves of the
channels and heads; one half attends within w x w windows, the other within the windows
shifted by w / 2 (a cyclic shift, with the tokens that wrapped round masked from the rest,
as in Swin), each with its own relative-position bias. At resolutions up to the window (4
and 8 px with the window of 8) the window is the whole map and neither half is shifted.

Discriminator ``D`` (the wavelet discriminator of StyleSwin, after SWAGAN)::

    x (B, C * T, S, S) -> Haar transform (B, 4 C T, S/2, S/2)
    per resolution r = S/2, ..., 8: the input's wavelets at r px (inverse transform, blur,
        x1/2, transform) through a 1x1 convolution, added to the features; a residual
        block (3x3, blur + 3x3 stride 2; skip blur + 1x1 stride 2; sum / sqrt 2) to r/2 px
    the wavelets at 4 px added                        -> trunk (B, width(4), 4, 4)
    minibatch standard deviation, 3x3 conv, linear, linear -> head: one logit per sample

The discriminator has the generator's width at each resolution, but at S/2 px, its first
(the wavelets of an S px image), that of S px, as StyleSwin's. Every convolution and linear
layer of it is spectrally normalised (StyleSwin's ``--D_sn``), in place of StyleGAN2's
equalised learning rate.

The encoder for finetuning heads (:class:`StyleSwinEncoder`) is the discriminator's trunk:
its 4 x 4 map as 16 tokens on a (1, 4, 4) grid, after their mean as a summary token. Its
trunk is named ``D`` as in :class:`StyleSwin`, so it loads from the GAN's state dict and
leaves ``G.``, ``G_ema.`` and ``D.head.`` unused.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sdofm.models.vit import Mlp, sincos_pos_embed_2d, to_2tuple

HEAD_DIM = 32
"""Channels per attention head (StyleSwin: ``num_heads = max(width // 32, 4)``)."""
MIN_HEADS = 4
"""At least two heads in each half of the double attention."""
LRELU_GAIN = math.sqrt(2.0)
"""Leaky ReLU (slope 0.2) outputs are scaled by sqrt 2 to keep unit variance (StyleGAN2)."""
MBSTD_GROUP = 4
"""Samples per group of the minibatch standard deviation."""


def width_at(resolution: int, channel_base: int, channel_max: int) -> int:
    """Channels of the generator at ``resolution`` px: min(channel_max, channel_base // r)."""
    return min(channel_max, channel_base // resolution)


def num_heads_for(dim: int) -> int:
    """Heads of a block of ``dim`` channels (even: half in each window pattern)."""
    heads = max(dim // HEAD_DIM, MIN_HEADS)
    if heads % 2 or dim % heads:
        raise ValueError(f"width {dim} does not split into an even number of {heads} heads")
    return heads


def lrelu(x: Tensor) -> Tensor:
    """x: (...) -> (...), leaky ReLU with slope 0.2 times sqrt 2."""
    return F.leaky_relu(x, 0.2) * LRELU_GAIN


def _resolutions(img_size: int | tuple[int, int]) -> int:
    """The side S of a square power-of-two image of at least 16 px."""
    H, W = to_2tuple(img_size)
    if H != W or H < 16 or H & (H - 1):
        raise ValueError(
            f"StyleSwin needs square power-of-two images of 16 px or more, got {H}x{W}"
        )
    return H


def stack_frames(x: Tensor, in_chans: int, num_frames: int, size: int) -> Tensor:
    """x: (B, C, T, H, W) -> (B, C * T, H, W), index c * T + t."""
    expected = (in_chans, num_frames, size, size)
    if x.ndim != 5 or tuple(x.shape[1:]) != expected:
        raise ValueError(f"expected input (B, {', '.join(map(str, expected))}), got {x.shape}")
    return x.reshape(x.shape[0], -1, size, size)


# --------------------------------------------------------------------------------------------
# losses (the objective runs them as phases; the model's forward returns them together)


def d_logistic_loss(real_logits: Tensor, fake_logits: Tensor) -> Tensor:
    """real_logits, fake_logits: (B,) -> (): the discriminator's logistic loss,
    mean softplus(-D(real)) + mean softplus(D(fake)), in float32 (bf16 logits too)."""
    return F.softplus(-real_logits.float()).mean() + F.softplus(fake_logits.float()).mean()


def g_nonsaturating_loss(fake_logits: Tensor) -> Tensor:
    """fake_logits: (B,) -> (): the generator's non-saturating loss, mean softplus(-D(G(z))),
    in float32."""
    return F.softplus(-fake_logits.float()).mean()


def r1_penalty(real_logits: Tensor, real: Tensor) -> Tensor:
    """real_logits: (B,) of D on ``real`` (any shape, requires grad) -> (): the R1 penalty
    (Mescheder et al. 2018), the squared norm of dD/dx per sample, averaged over the batch;
    differentiable in D's weights (the graph of the gradient is kept)."""
    (grad,) = torch.autograd.grad(real_logits.sum(), real, create_graph=True)
    return grad.pow(2).flatten(1).sum(1).mean()


# --------------------------------------------------------------------------------------------
# Haar wavelets and blur


def haar_dwt(x: Tensor) -> Tensor:
    """x: (B, C, H, W) -> (B, 4C, H/2, W/2): the orthonormal Haar transform, bands (LL, LH,
    HL, HH) in that order, each C channels. Of the 2x2 block [[a, b], [c, d]] (rows y, y+1;
    columns x, x+1): LL = (a+b+c+d)/2, LH = (a+b-c-d)/2 (rows differ), HL = (a-b+c-d)/2
    (columns differ), HH = (a-b-c+d)/2."""
    a, b = x[..., 0::2, 0::2], x[..., 0::2, 1::2]
    c, d = x[..., 1::2, 0::2], x[..., 1::2, 1::2]
    return 0.5 * torch.cat([a + b + c + d, a + b - c - d, a - b + c - d, a - b - c + d], dim=1)


def haar_idwt(y: Tensor) -> Tensor:
    """y: (B, 4C, h, w) -> (B, C, 2h, 2w): the inverse of :func:`haar_dwt`."""
    ll, lh, hl, hh = y.chunk(4, dim=1)
    B, C, h, w = ll.shape
    x = y.new_empty(B, C, 2 * h, 2 * w)
    x[..., 0::2, 0::2] = 0.5 * (ll + lh + hl + hh)
    x[..., 0::2, 1::2] = 0.5 * (ll + lh - hl - hh)
    x[..., 1::2, 0::2] = 0.5 * (ll - lh + hl - hh)
    x[..., 1::2, 1::2] = 0.5 * (ll - lh - hl + hh)
    return x


def blur(x: Tensor, pad: int, stride: int = 1) -> Tensor:
    """x: (B, C, H, W) -> (B, C, (H + 2 pad - 4) // stride + 1, ...): the [1, 3, 3, 1]^2 / 64
    low-pass of StyleGAN2 with ``pad`` zeros on each side, every ``stride``-th pixel (the
    anti-aliasing before a stride-2 convolution)."""
    k1 = x.new_tensor([1.0, 3.0, 3.0, 1.0])
    k = torch.outer(k1, k1) / 64.0
    C = x.shape[1]
    return F.conv2d(F.pad(x, (pad,) * 4), k.expand(C, 1, 4, 4), stride=stride, groups=C)


def wavelet_down(y: Tensor) -> Tensor:
    """y: (B, 4C, h, w) wavelets of an image -> (B, 4C, h/2, w/2): those of the image blurred
    and halved (inverse transform, blur, x1/2, transform)."""
    return haar_dwt(blur(haar_idwt(y), pad=1, stride=2))


# --------------------------------------------------------------------------------------------
# generator parts


class PixelNorm(nn.Module):
    """z: (B, D) -> (B, D), each sample scaled to unit root-mean-square."""

    def forward(self, z: Tensor) -> Tensor:
        return z * torch.rsqrt(z.pow(2).mean(dim=1, keepdim=True) + 1e-8)


class EqualLinear(nn.Module):
    """A linear layer with equalised learning rate (Karras et al. 2018): weights stored as
    N(0, 1) / lr_mul and scaled by lr_mul / sqrt(in_dim) when used, so Adam moves every layer
    at the same relative speed; ``lr_mul`` < 1 slows the layer down (the mapping network's
    0.01). x: (..., in_dim) -> (..., out_dim), through :func:`lrelu` with ``activate``."""

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        bias_init: float = 0.0,
        lr_mul: float = 1.0,
        activate: bool = False,
    ) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_dim, in_dim) / lr_mul)
        self.bias = nn.Parameter(torch.full((out_dim,), float(bias_init)) / lr_mul)
        self.scale, self.lr_mul, self.activate = lr_mul / math.sqrt(in_dim), lr_mul, activate

    def forward(self, x: Tensor) -> Tensor:
        y = F.linear(x, self.weight * self.scale, self.bias * self.lr_mul)
        return lrelu(y) if self.activate else y


class AdaIN(nn.Module):
    """Adaptive instance norm, StyleSwin's replacement of LayerNorm: each channel normalised
    over the tokens of a sample, then scaled and shifted by affine maps of the style.
    x: (B, L, C), w: (B, style_dim) -> (B, L, C)."""

    def __init__(self, dim: int, style_dim: int) -> None:
        super().__init__()
        self.style = EqualLinear(style_dim, 2 * dim)
        with torch.no_grad():
            self.style.bias[:dim] = 1.0  # the scale starts near 1, the shift near 0

    def forward(self, x: Tensor, w: Tensor) -> Tensor:
        gamma, beta = self.style(w).unsqueeze(1).chunk(2, dim=-1)
        x = x.float()  # statistics over up to 512^2 tokens: float32 under autocast too
        mean, var = x.mean(dim=1, keepdim=True), x.var(dim=1, unbiased=False, keepdim=True)
        return gamma * (x - mean) * torch.rsqrt(var + 1e-5) + beta


def relative_position_index(window: int) -> Tensor:
    """-> (N, N) int64, N = window^2: for tokens i, j of a window (row-major) the index of
    their offset (dy, dx) in a (2 window - 1)^2 table, (dy + w - 1) * (2w - 1) + dx + w - 1."""
    rows, cols = torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")
    rows, cols = rows.flatten(), cols.flatten()
    dy = rows[:, None] - rows[None, :] + window - 1
    dx = cols[:, None] - cols[None, :] + window - 1
    return dy * (2 * window - 1) + dx


def shifted_window_mask(resolution: int, window: int, shift: int) -> Tensor:
    """-> (nW, N, N) float: 0 where two tokens of one window of the cyclically shifted map
    (rolled by -shift) may attend to each other, -inf where they came from different sides of
    the wrap (Swin's mask). Windows in row-major order, tokens row-major within a window."""
    edges = (0, resolution - window, resolution - shift, resolution)
    labels = torch.zeros(resolution, dtype=torch.long)
    for k in range(3):
        labels[edges[k] : edges[k + 1]] = k
    region = (labels[:, None] * 3 + labels[None, :]).float()  # (r, r) in rolled coordinates
    n = resolution // window
    win = region.view(n, window, n, window).permute(0, 2, 1, 3).reshape(n * n, window * window)
    same = win[:, :, None] == win[:, None, :]
    return torch.zeros(same.shape).masked_fill(~same, float("-inf"))


class DoubleAttention(nn.Module):
    """StyleSwin's double attention on an r x r map of tokens: one qkv projection; the first
    half of the channels (and heads) attends within w x w windows, the second half within the
    windows shifted by w // 2; each half has its own relative-position bias; the halves are
    concatenated and projected. Up to r = w the window is the whole map, unshifted.
    x: (B, r * r, C) -> (B, r * r, C)."""

    def __init__(self, dim: int, num_heads: int, resolution: int, window: int) -> None:
        super().__init__()
        if num_heads % 2 or dim % num_heads:
            raise ValueError(f"dim {dim} and {num_heads} heads do not split in two halves")
        self.resolution = resolution
        self.window = min(window, resolution)
        self.shift = self.window // 2 if resolution > self.window else 0
        if resolution % self.window:
            raise ValueError(f"resolution {resolution} is not a multiple of window {window}")
        self.half_heads = num_heads // 2
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        table = ((2 * self.window - 1) ** 2, self.half_heads)
        self.bias_plain = nn.Parameter(torch.zeros(table))
        self.bias_shifted = nn.Parameter(torch.zeros(table))
        nn.init.trunc_normal_(self.bias_plain, std=0.02)
        nn.init.trunc_normal_(self.bias_shifted, std=0.02)
        self.register_buffer("rel_index", relative_position_index(self.window), persistent=False)
        mask = shifted_window_mask(resolution, self.window, self.shift) if self.shift else None
        self.register_buffer("shift_mask", mask, persistent=False)

    def _attend(self, qkv: Tensor, table: Tensor, mask: Tensor | None) -> Tensor:
        """qkv: (B, r, r, 3, h, d) -> (B, r, r, h * d): attention within each w x w window."""
        B, r, _, _, h, d = qkv.shape
        w, n = self.window, r // self.window
        N = w * w
        t = qkv.reshape(B, n, w, n, w, 3, h, d).permute(5, 0, 1, 3, 6, 2, 4, 7)
        q, k, v = t.reshape(3, B, n * n * h, N, d).unbind(0)  # (B, windows x heads, N, d)
        bias = table[self.rel_index].permute(2, 0, 1).unsqueeze(0)  # (1, h, N, N)
        bias = bias + mask.unsqueeze(1) if mask is not None else bias.expand(n * n, h, N, N)
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=bias.reshape(n * n * h, N, N).to(q.dtype)
        )
        out = out.reshape(B, n, n, h, w, w, d).permute(0, 1, 4, 2, 5, 3, 6)
        return out.reshape(B, r, r, h * d)

    def forward(self, x: Tensor) -> Tensor:
        B, L, C = x.shape
        r, s = self.resolution, self.shift
        qkv = self.qkv(x).reshape(B, r, r, 3, 2, self.half_heads, self.head_dim)
        plain = self._attend(qkv[:, :, :, :, 0], self.bias_plain, None)
        shifted = qkv[:, :, :, :, 1]
        if s:
            shifted = shifted.roll((-s, -s), dims=(1, 2))
        shifted = self._attend(shifted, self.bias_shifted, self.shift_mask)
        if s:
            shifted = shifted.roll((s, s), dims=(1, 2))
        return self.proj(torch.cat([plain, shifted], dim=-1).reshape(B, L, C))


class StyleSwinBlock(nn.Module):
    """x + DoubleAttention(AdaIN(x, w)), then x + MLP(AdaIN(x, w)).
    x: (B, r * r, C), w: (B, style_dim) -> (B, r * r, C)."""

    def __init__(
        self, dim: int, resolution: int, window: int, style_dim: int, mlp_ratio: float
    ) -> None:
        super().__init__()
        self.norm1 = AdaIN(dim, style_dim)
        self.attn = DoubleAttention(dim, num_heads_for(dim), resolution, window)
        self.norm2 = AdaIN(dim, style_dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: Tensor, w: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x, w))
        return x + self.mlp(self.norm2(x, w))


class Upsample(nn.Module):
    """Between resolutions: bilinear x2, LayerNorm, linear (no bias) to ``out_dim``, plus the
    sin-cos position grid times ``alpha`` (learned, from 0: the generator starts without it).
    x: (B, r * r, C) -> (B, 4 r * r, out_dim)."""

    def __init__(self, resolution: int, dim: int, out_dim: int) -> None:
        super().__init__()
        self.resolution = resolution
        self.norm = nn.LayerNorm(dim)
        self.reduction = nn.Linear(dim, out_dim, bias=False)
        self.alpha = nn.Parameter(torch.zeros(1))
        # Fixed, rebuilt from the config: kept out of checkpoints.
        grid = sincos_pos_embed_2d(out_dim, 2 * resolution, 2 * resolution)
        self.register_buffer("pos", grid.unsqueeze(0), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        B, _, C = x.shape
        r = self.resolution
        x = x.transpose(1, 2).reshape(B, C, r, r)
        x = F.interpolate(x, scale_factor=2.0, mode="bilinear", align_corners=False)
        x = self.reduction(self.norm(x.flatten(2).transpose(1, 2)))
        return x + self.alpha * self.pos


class GeneratorStage(nn.Module):
    """One resolution of the generator: two StyleSwin blocks, the to-image convolution and
    (below the output size) the upsampling to the next resolution."""

    def __init__(
        self,
        resolution: int,
        dim: int,
        next_dim: int | None,
        out_chans: int,
        window: int,
        style_dim: int,
        mlp_ratio: float,
    ) -> None:
        super().__init__()
        self.resolution = resolution
        self.blocks = nn.ModuleList(
            StyleSwinBlock(dim, resolution, window, style_dim, mlp_ratio) for _ in range(2)
        )
        self.to_image = nn.Conv2d(dim, out_chans, 1)
        self.upsample = Upsample(resolution, dim, next_dim) if next_dim else None


class Generator(nn.Module):
    """StyleSwin's generator. z: (B, style_dim) -> images (B, C, T, S, S)."""

    def __init__(
        self,
        img_size: int = 64,
        in_chans: int = 12,
        num_frames: int = 1,
        style_dim: int = 512,
        n_mlp: int = 8,
        lr_mlp: float = 0.01,
        channel_base: int = 32768,
        channel_max: int = 512,
        window_size: int = 8,
        mlp_ratio: float = 4.0,
    ) -> None:
        super().__init__()
        S = _resolutions(img_size)
        self.img_size, self.in_chans, self.num_frames = S, in_chans, num_frames
        self.style_dim = style_dim
        self.mapping = nn.Sequential(
            PixelNorm(),
            *(
                EqualLinear(style_dim, style_dim, lr_mul=lr_mlp, activate=True)
                for _ in range(n_mlp)
            ),
        )
        resolutions = [2**k for k in range(2, int(math.log2(S)) + 1)]
        widths = [width_at(r, channel_base, channel_max) for r in resolutions]
        self.const = nn.Parameter(torch.randn(1, widths[0], 4, 4))
        self.stages = nn.ModuleList(
            GeneratorStage(
                r,
                widths[i],
                widths[i + 1] if i + 1 < len(widths) else None,
                in_chans * num_frames,
                window_size,
                style_dim,
                mlp_ratio,
            )
            for i, r in enumerate(resolutions)
        )
        for stage in self.stages:
            stage.apply(_init_generator_weights)

    def forward(self, z: Tensor) -> Tensor:
        """z: (B, style_dim) -> (B, C, T, S, S)."""
        B = z.shape[0]
        w = self.mapping(z)
        x = self.const.flatten(2).transpose(1, 2).expand(B, -1, -1)  # (B, 16, width(4))
        image = None
        for stage in self.stages:
            for block in stage.blocks:
                x = block(x, w)
            r = stage.resolution
            out = stage.to_image(x.transpose(1, 2).reshape(B, -1, r, r))
            if image is not None:
                image = F.interpolate(image, scale_factor=2.0, mode="bilinear", align_corners=False)
                out = out + image
            image = out
            if stage.upsample is not None:
                x = stage.upsample(x)
        return image.reshape(B, self.in_chans, self.num_frames, self.img_size, self.img_size)


def _init_generator_weights(m: nn.Module) -> None:
    """StyleSwin's init: linear layers N(0, 0.02) truncated, zero bias; to-image
    convolutions xavier-normal with gain 0.02 (images start near zero)."""
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.Conv2d):
        nn.init.xavier_normal_(m.weight, gain=0.02)
        nn.init.zeros_(m.bias)


# --------------------------------------------------------------------------------------------
# discriminator parts


class _SpectralNorm:
    """The weight divided by its largest singular value sigma (Miyato et al. 2018), sigma
    estimated by power iteration with a persistent left vector ``u``: one iteration per call
    in training mode, none in inference (so evaluation leaves the buffers alone)."""

    weight: nn.Parameter
    u: Tensor
    training: bool

    def _init_spectral_norm(self, iterations: int = 10) -> None:
        self.register_buffer("u", F.normalize(torch.randn(self.weight.shape[0]), dim=0))
        with torch.no_grad():  # start from a converged estimate of the initial weights
            w = self.weight.flatten(1)
            for _ in range(iterations):
                self.u.copy_(F.normalize(w @ F.normalize(w.t() @ self.u, dim=0), dim=0))

    def normalised_weight(self) -> Tensor:
        w = self.weight.flatten(1)
        with torch.autocast(w.device.type, enabled=False):
            with torch.no_grad():
                if self.training:
                    self.u.copy_(F.normalize(w @ F.normalize(w.t() @ self.u, dim=0), dim=0))
                v = F.normalize(w.t() @ self.u, dim=0)
            # A copy: a later call updates ``u`` in place, which backward must not see.
            sigma = torch.dot(self.u.clone(), w @ v)
        return self.weight / sigma


class SNConv2d(_SpectralNorm, nn.Conv2d):
    """A spectrally normalised convolution. x: (B, c_in, H, W) -> (B, c_out, H', W')."""

    def __init__(self, *args, **kwargs) -> None:
        nn.Conv2d.__init__(self, *args, **kwargs)
        self._init_spectral_norm()

    def forward(self, x: Tensor) -> Tensor:
        return self._conv_forward(x, self.normalised_weight(), self.bias)


class SNLinear(_SpectralNorm, nn.Linear):
    """A spectrally normalised linear layer. x: (..., in) -> (..., out)."""

    def __init__(self, *args, **kwargs) -> None:
        nn.Linear.__init__(self, *args, **kwargs)
        self._init_spectral_norm()

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.normalised_weight(), self.bias)


class FromWavelets(nn.Module):
    """The image's wavelets at one resolution into features: 1x1 convolution, leaky ReLU.
    y: (B, 4 C, r, r) -> (B, width, r, r)."""

    def __init__(self, in_chans: int, width: int) -> None:
        super().__init__()
        self.conv = SNConv2d(4 * in_chans, width, 1)

    def forward(self, y: Tensor) -> Tensor:
        return lrelu(self.conv(y))


class ResidualBlock(nn.Module):
    """StyleGAN2's residual discriminator block, to half the resolution:
    (conv3x3, blur + conv3x3 stride 2) + (blur + conv1x1 stride 2, linear), over sqrt 2.
    x: (B, c_in, r, r) -> (B, c_out, r/2, r/2)."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.conv1 = SNConv2d(c_in, c_in, 3, padding=1)
        self.conv2 = SNConv2d(c_in, c_out, 3, stride=2)
        self.skip = SNConv2d(c_in, c_out, 1, stride=2, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        y = lrelu(self.conv2(blur(lrelu(self.conv1(x)), pad=2)))
        return (y + self.skip(blur(x, pad=1))) / math.sqrt(2.0)


def minibatch_stddev(x: Tensor, group_size: int = MBSTD_GROUP) -> Tensor:
    """x: (B, C, H, W) -> (B, C + 1, H, W): one more channel holding, for each group of
    samples (b, b + M, b + 2M, ... with M = B / group), the standard deviation over the group
    of every feature, averaged over the features (StyleGAN's minibatch statistic: a batch of
    too-similar samples stands out). The group is the largest divisor of B up to
    ``group_size``, so that any batch size works."""
    B, C, H, W = x.shape
    G = math.gcd(B, group_size)
    y = x.float().reshape(G, B // G, C, H, W)
    std = (y.var(dim=0, unbiased=False) + 1e-8).sqrt().mean(dim=(1, 2, 3))  # (B / G,)
    std = std.to(x.dtype).reshape(1, -1, 1, 1, 1).expand(G, -1, 1, H, W).reshape(B, 1, H, W)
    return torch.cat([x, std], dim=1)


class DiscriminatorTrunk(nn.Module):
    """The discriminator up to its 4 x 4 map: Haar wavelets of the input, and at every
    resolution from S/2 to 8 px the wavelets at that scale added to the features before a
    residual block halves them; the wavelets at 4 px added last.
    x: (B, C, T, S, S) -> (B, width(4), 4, 4)."""

    def __init__(
        self,
        img_size: int = 64,
        in_chans: int = 12,
        num_frames: int = 1,
        channel_base: int = 32768,
        channel_max: int = 512,
    ) -> None:
        super().__init__()
        S = _resolutions(img_size)
        self.img_size, self.in_chans, self.num_frames = S, in_chans, num_frames
        c = in_chans * num_frames
        resolutions = [S // 2**k for k in range(1, int(math.log2(S)) - 1)]  # S/2 ... 4
        widths = [width_at(r, channel_base, channel_max) for r in resolutions]
        widths[0] = width_at(S, channel_base, channel_max)
        self.from_wavelets = nn.ModuleList(FromWavelets(c, w) for w in widths)
        self.blocks = nn.ModuleList(
            ResidualBlock(c_in, c_out) for c_in, c_out in zip(widths, widths[1:], strict=False)
        )
        self.out_channels = widths[-1]

    def trunk(self, x: Tensor) -> Tensor:
        """x: (B, C, T, S, S) -> (B, width(4), 4, 4)."""
        y = haar_dwt(stack_frames(x, self.in_chans, self.num_frames, self.img_size))
        h = None
        for k, block in enumerate(self.blocks):
            if k:
                y = wavelet_down(y)
            f = self.from_wavelets[k](y)
            h = block(f if h is None else h + f)
        return h + self.from_wavelets[-1](wavelet_down(y))

    def forward(self, x: Tensor) -> Tensor:
        return self.trunk(x)


class DiscriminatorHead(nn.Module):
    """Minibatch standard deviation, 3x3 convolution, two linear layers.
    h: (B, c_in, 4, 4) -> (B,) logits."""

    def __init__(self, c_in: int, width: int) -> None:
        super().__init__()
        self.conv = SNConv2d(c_in + 1, width, 3, padding=1)
        self.fc = SNLinear(width * 16, width)
        self.out = SNLinear(width, 1)

    def forward(self, h: Tensor) -> Tensor:
        h = lrelu(self.conv(minibatch_stddev(h)))
        return self.out(lrelu(self.fc(h.flatten(1)))).squeeze(1)


class Discriminator(DiscriminatorTrunk):
    """The trunk (inherited, so its weights are named as in :class:`DiscriminatorTrunk`) and
    the head. x: (B, C, T, S, S) -> (B,) logits, real > 0."""

    def __init__(
        self,
        img_size: int = 64,
        in_chans: int = 12,
        num_frames: int = 1,
        channel_base: int = 32768,
        channel_max: int = 512,
    ) -> None:
        super().__init__(img_size, in_chans, num_frames, channel_base, channel_max)
        self.head = DiscriminatorHead(self.out_channels, width_at(4, channel_base, channel_max))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.trunk(x))


# --------------------------------------------------------------------------------------------
# encoder and the whole GAN


class StyleSwinEncoder(nn.Module):
    """The discriminator's trunk as an encoder for finetuning heads: its 4 x 4 map as 16
    tokens (row-major, on a (1, 4, 4) grid: each stands for an S/4 x S/4 patch of every
    frame), normalised, after their mean as a summary token.

    The trunk is named ``D``, as in :class:`StyleSwin`, so this loads from the GAN's state
    dict. ``blocks`` are the trunk's residual blocks, shallow to deep; ``norm`` is a
    LayerNorm without parameters (the GAN never trained one).
    """

    def __init__(
        self,
        img_size: int = 64,
        in_chans: int = 12,
        num_frames: int = 1,
        channel_base: int = 32768,
        channel_max: int = 512,
    ) -> None:
        super().__init__()
        self.encoder_config = dict(
            img_size=img_size,
            in_chans=in_chans,
            num_frames=num_frames,
            channel_base=channel_base,
            channel_max=channel_max,
        )
        self.D = DiscriminatorTrunk(img_size, in_chans, num_frames, channel_base, channel_max)
        self.img_size = to_2tuple(img_size)
        self.in_chans, self.num_frames = in_chans, num_frames
        self.embed_dim = self.D.out_channels
        self.grid_size = (1, 4, 4)
        self.norm = nn.LayerNorm(self.embed_dim, elementwise_affine=False)

    @property
    def blocks(self) -> nn.ModuleList:
        return self.D.blocks

    def forward_features(self, x: Tensor) -> Tensor:
        """x: (B, C, T, H, W) -> (B, 1 + 16, embed_dim): the mean token, then the 4 x 4 map."""
        tokens = self.norm(self.D.trunk(x).flatten(2).transpose(1, 2))
        return torch.cat([tokens.mean(dim=1, keepdim=True), tokens], dim=1)

    def forward(self, x: Tensor) -> Tensor:
        """x: (B, C, T, H, W) -> (B, 17, embed_dim), as forward_features."""
        return self.forward_features(x)


class StyleSwin(nn.Module):
    """The GAN: generator ``G``, discriminator ``D`` and ``G_ema``, the exponential moving
    average of G's weights (no gradients, in no optimiser; what samples are drawn from).

    Training runs the losses as separate phases (``sdofm.pretraining.styleswin``); ``forward``
    returns both on one batch, for tests and quick checks.
    """

    def __init__(
        self,
        img_size: int = 64,
        in_chans: int = 12,
        num_frames: int = 1,
        style_dim: int = 512,
        n_mlp: int = 8,
        lr_mlp: float = 0.01,
        channel_base: int = 32768,
        channel_max: int = 512,
        window_size: int = 8,
        mlp_ratio: float = 4.0,
    ) -> None:
        super().__init__()
        self.img_size = to_2tuple(img_size)
        self.in_chans, self.num_frames, self.style_dim = in_chans, num_frames, style_dim
        self.window_size = window_size
        self.G = Generator(
            img_size,
            in_chans,
            num_frames,
            style_dim,
            n_mlp,
            lr_mlp,
            channel_base,
            channel_max,
            window_size,
            mlp_ratio,
        )
        self.D = Discriminator(img_size, in_chans, num_frames, channel_base, channel_max)
        self.G_ema = copy.deepcopy(self.G).requires_grad_(False)
        self.encoder_config = dict(
            img_size=img_size,
            in_chans=in_chans,
            num_frames=num_frames,
            channel_base=channel_base,
            channel_max=channel_max,
        )

    def forward(self, imgs: Tensor, z: Tensor | None = None) -> dict[str, Tensor]:
        """imgs: (B, C, T, H, W) real images, z: (B, style_dim) (drawn when None) ->
        {"loss": (), "loss_D": (), "loss_G": (), "fake": (B, C, T, H, W), "d_real": (B,),
        "d_fake": (B,)}. ``loss`` = loss_D (on detached samples) + loss_G reaches every
        trainable weight; training steps D and G on their own losses instead."""
        if z is None:
            z = torch.randn(imgs.shape[0], self.style_dim, device=imgs.device)
        fake = self.G(z)
        d_real = self.D(imgs)
        loss_d = d_logistic_loss(d_real, self.D(fake.detach()))
        d_fake = self.D(fake)
        loss_g = g_nonsaturating_loss(d_fake)
        return {
            "loss": loss_d + loss_g,
            "loss_D": loss_d,
            "loss_G": loss_g,
            "fake": fake,
            "d_real": d_real,
            "d_fake": d_fake,
        }

    @torch.no_grad()
    def update_ema(self, beta: float) -> None:
        """G_ema <- beta * G_ema + (1 - beta) * G, weight by weight; buffers copied."""
        for ema, p in zip(self.G_ema.parameters(), self.G.parameters(), strict=True):
            ema.lerp_(p, 1.0 - beta)
        for ema, b in zip(self.G_ema.buffers(), self.G.buffers(), strict=True):
            ema.copy_(b)

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """-> (n, C, T, H, W) images of ``G_ema`` for z ~ N(0, I), drawn from ``generator``
        (a CPU generator) when given."""
        device = self.G_ema.const.device
        z = torch.randn(n, self.style_dim, generator=generator).to(device)
        return self.G_ema(z)

    def encoder(self) -> StyleSwinEncoder:
        """A standalone :class:`StyleSwinEncoder` holding a copy of D's trunk weights."""
        enc = StyleSwinEncoder(**self.encoder_config)
        missing, _ = enc.load_state_dict(self.state_dict(), strict=False)
        assert not missing, f"encoder weights missing from the GAN: {missing}"
        return enc.to(self.G.const.device)
