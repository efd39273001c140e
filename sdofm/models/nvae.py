"""NVAE (Vahdat & Kautz 2020): a deep hierarchical VAE with a bottom-up encoder and a top-down
decoder, over image sequences ``x: (B, C, T, H, W)`` (frames are stacked as channels, C * T).

Layout, with S = ``num_scales`` and g = ``groups_per_scale``::

    bottom-up  stem (H x W) -> [down cell, g x (encoder cells)] per scale, H/2 ... H/2^S
    top-down   learned constant (H/2^S) -> per group: cells, prior, posterior, combine z
               -> up cell between scales -> up cell to H x W, cell -> mean, log-scale

Latent groups are ordered top-down, coarsest first (group 0 at H/2^S, the last at H/2); the
bottom-up feature after a group's encoder cells conditions that group's posterior.

Training, as the paper: minimise ``out["loss"] + lambda_sr * model.spectral_loss()`` with
``out = model(x, kl_weight=kl_warmup_weight(step, total_steps))``; the KL weight rises from
1e-4 to 1 over the first 30 % of steps (SDO-FM's ``kl_anneal_portion``), and during that rise
the per-group KL terms are balanced (:func:`kl_balance_coeffs`) so that no group collapses;
``free_bits`` (Kingma et al. 2016) keeps a floor of KL per group free of cost throughout.
The top group's prior is N(0, I); each lower group's is computed from the state above it.

Posterior collapse is counted with :func:`active_units` over samples that differ: the Sun
changes little within a day, so a single day's posterior means vary too little to count.

Left out of the paper's recipe: normalising flows, weight normalisation with its norm
penalty (the spectral term is kept), and the batch-norm statistics re-estimation before
sampling at low temperature.

Names follow the finetuning contract: the bottom-up path is ``stem`` and ``blocks`` with the
same names as in :class:`NVAEEncoder`, and everything else (top-down cells, priors, posterior
heads, which condition on the top-down state, and the output head) lives under
``decoder_net.``, a prefix that passes the finetuning loader's rules for decoder keys (which
accept ``decoder_...``, as the MAE's decoder keys are named).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sdofm.models.vit import to_2tuple

LATENT_LOGSIG_RANGE = (-7.0, 4.0)
"""Clamp of latent log-scales: keeps exp(2 logsig) finite in the KL."""
PIXEL_LOGSIG_RANGE = (-4.0, 2.0)
"""Clamp of the decoder's per-pixel log-scale (z-scored data: 0.02 to 7.4 sigma)."""
HALF_LOG_2PI = 0.5 * math.log(2.0 * math.pi)


# --------------------------------------------------------------------------------------------
# probability


def kl_normal(mu_q: Tensor, logsig_q: Tensor, mu_p: Tensor, logsig_p: Tensor) -> Tensor:
    """KL(N(mu_q, sig_q^2) || N(mu_p, sig_p^2)), elementwise; all inputs (...) -> (...), nats."""
    ratio = torch.exp(2.0 * (logsig_q - logsig_p))
    return 0.5 * (ratio + ((mu_q - mu_p) * torch.exp(-logsig_p)).pow(2) - 1.0) - (
        logsig_q - logsig_p
    )


def gaussian_nll(x: Tensor, mu: Tensor, logsig: Tensor) -> Tensor:
    """-log N(x; mu, exp(logsig)^2), elementwise; all (...) -> (...), nats."""
    return HALF_LOG_2PI + logsig + 0.5 * ((x - mu) * torch.exp(-logsig)).pow(2)


def kl_balance_coeffs(kl_per_latent: Tensor, sizes: Tensor) -> Tensor:
    """kl_per_latent: (G,) mean KL per latent variable of each group, sizes: (G,) the groups'
    spatial sizes h * w -> (G,) coefficients, proportional to size * KL, summing to G, detached.

    NVAE appendix A: during the KL warm-up a group with a large KL pays more, so that groups
    which carry little information stay cheap to use and none collapses. The 0.01 keeps the
    coefficients defined when every KL is zero.
    """
    gamma = sizes * (kl_per_latent.detach().abs() + 0.01)
    return (gamma * (gamma.numel() / gamma.sum())).detach()


def kl_warmup_weight(
    step: int, total_steps: int, warmup_portion: float = 0.3, min_weight: float = 1e-4
) -> float:
    """KL weight at `step`: linear from `min_weight` to 1 over the first `warmup_portion` of
    `total_steps`, then 1 (NVAE's KL warm-up)."""
    warmup = warmup_portion * total_steps
    if warmup <= 0 or step >= warmup:
        return 1.0
    return max(min_weight, step / warmup)


def active_units(means: list[Tensor], threshold: float = 0.01) -> Tensor:
    """means: per group (N, c, h, w) posterior means of N samples -> (G,) int64: the latent
    variables (of c * h * w per group) whose posterior mean varies across the samples with a
    variance above `threshold` (Burda et al. 2016: each latent dimension is a unit).

    Every position counts on its own: the Sun's changes are local (active regions, flares),
    and a channel averaged over the whole map, corners of empty sky included, would hide them.
    """
    sums = [m.double().sum(0) for m in means]
    squares = [(m.double() ** 2).sum(0) for m in means]
    return active_units_from_moments(sums, squares, len(means[0]), threshold)


def active_units_from_moments(
    sums: list[Tensor], squares: list[Tensor], n: int, threshold: float = 0.01
) -> Tensor:
    """:func:`active_units` from running moments, for data too large to hold (summed over
    batches and workers): per group the sum and the sum of squares over ``n`` samples of
    the posterior means, each (c, h, w) -> (G,) int64."""
    return torch.stack(
        [((q / n - (s / n) ** 2) > threshold).sum() for s, q in zip(sums, squares, strict=True)]
    )


# --------------------------------------------------------------------------------------------
# cells


class Conv2d(nn.Conv2d):
    """A convolution with a persistent power-iteration vector ``sr_u`` (out_channels,) for
    the spectral regularisation: one step per training call tracks the largest singular value.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.register_buffer("sr_u", F.normalize(torch.randn(self.out_channels), dim=0))

    def spectral_norm(self, update: bool = True) -> Tensor:
        """-> () the largest singular value of the weight as (out, in * k * k), differentiable
        in the weight; one power iteration updates ``sr_u`` when `update`.
        """
        w = self.weight.reshape(self.out_channels, -1)
        with torch.no_grad():
            v = F.normalize(w.t() @ self.sr_u, dim=0, eps=1e-12)
            if update:
                self.sr_u.copy_(F.normalize(w @ v, dim=0, eps=1e-12))
                v = F.normalize(w.t() @ self.sr_u, dim=0, eps=1e-12)
        return torch.dot(self.sr_u, w @ v)


class SqueezeExcite(nn.Module):
    """Channel gating from the global average. x: (B, c, h, w) -> (B, c, h, w)."""

    def __init__(self, c: int, reduction: int = 16) -> None:
        super().__init__()
        hidden = max(c // reduction, 4)
        self.fc = nn.Sequential(
            nn.Linear(c, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, c), nn.Sigmoid()
        )

    def forward(self, x: Tensor) -> Tensor:
        return x * self.fc(x.mean(dim=(2, 3)))[:, :, None, None]


class EncoderCell(nn.Module):
    """Residual cell BN-Swish-Conv3x3-BN-Swish-Conv3x3-SE; the branch is scaled by `res_scale`
    (0.1) so that deep stacks start near the identity. x: (B, c, h, w) -> (B, c, h, w)."""

    def __init__(self, c: int, res_scale: float = 0.1) -> None:
        super().__init__()
        self.res_scale = res_scale
        self.branch = nn.Sequential(
            nn.BatchNorm2d(c),
            nn.SiLU(),
            Conv2d(c, c, 3, padding=1),
            nn.BatchNorm2d(c),
            nn.SiLU(),
            Conv2d(c, c, 3, padding=1),
            SqueezeExcite(c),
        )

    def forward(self, x: Tensor) -> Tensor:
        return x + self.res_scale * self.branch(x)


class DownCell(nn.Module):
    """The encoder cell with a stride-2 first convolution and `c_out` channels; the skip is a
    2x2 average and a 1x1 convolution. x: (B, c_in, h, w) -> (B, c_out, h / 2, w / 2)."""

    def __init__(self, c_in: int, c_out: int, res_scale: float = 0.1) -> None:
        super().__init__()
        self.res_scale = res_scale
        self.skip = nn.Sequential(nn.AvgPool2d(2), Conv2d(c_in, c_out, 1))
        self.branch = nn.Sequential(
            nn.BatchNorm2d(c_in),
            nn.SiLU(),
            Conv2d(c_in, c_out, 3, stride=2, padding=1),
            nn.BatchNorm2d(c_out),
            nn.SiLU(),
            Conv2d(c_out, c_out, 3, padding=1),
            SqueezeExcite(c_out),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.skip(x) + self.res_scale * self.branch(x)


def _generative_branch(c_in: int, c_out: int, expand: int) -> nn.Sequential:
    """BN-Conv1x1(expand)-BN-Swish-DWConv5x5-BN-Swish-Conv1x1-BN-SE, the paper's decoder cell."""
    e = c_in * expand
    return nn.Sequential(
        nn.BatchNorm2d(c_in),
        Conv2d(c_in, e, 1),
        nn.BatchNorm2d(e),
        nn.SiLU(),
        Conv2d(e, e, 5, padding=2, groups=e),
        nn.BatchNorm2d(e),
        nn.SiLU(),
        Conv2d(e, c_out, 1),
        nn.BatchNorm2d(c_out),
        SqueezeExcite(c_out),
    )


class DecoderCell(nn.Module):
    """Residual generative cell (depthwise-separable, expansion `expand`), branch scaled by
    `res_scale`. x: (B, c, h, w) -> (B, c, h, w)."""

    def __init__(self, c: int, expand: int = 3, res_scale: float = 0.1) -> None:
        super().__init__()
        self.res_scale = res_scale
        self.branch = _generative_branch(c, c, expand)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.res_scale * self.branch(x)


class UpCell(nn.Module):
    """Nearest x2 upsampling, then the generative cell to `c_out` channels; the skip is the
    upsampled input through a 1x1 convolution. x: (B, c_in, h, w) -> (B, c_out, 2h, 2w)."""

    def __init__(self, c_in: int, c_out: int, expand: int = 3, res_scale: float = 0.1) -> None:
        super().__init__()
        self.res_scale = res_scale
        self.skip = Conv2d(c_in, c_out, 1)
        self.branch = _generative_branch(c_in, c_out, expand)

    def forward(self, x: Tensor) -> Tensor:
        x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        return self.skip(x) + self.res_scale * self.branch(x)


# --------------------------------------------------------------------------------------------
# bottom-up encoder


class NVAEEncoder(nn.Module):
    """The bottom-up path: a 3x3 stem, then per scale a down cell and `groups_per_scale` groups
    of `cells_per_group` encoder cells. Its deepest map is the finetuning feature.

    ``blocks`` holds every cell, shallow to deep, so "partial" freezing unfreezes the last k.
    ``norm`` is a LayerNorm without affine parameters: the autoencoder never uses it, so it
    must carry no weights that pretraining would leave untrained.
    """

    def __init__(
        self,
        img_size: int | tuple[int, int] = 64,
        in_chans: int = 12,
        num_frames: int = 1,
        channels: int = 32,
        num_scales: int = 2,
        groups_per_scale: int = 2,
        cells_per_group: int = 1,
        res_scale: float = 0.1,
    ) -> None:
        super().__init__()
        self.encoder_config = dict(
            img_size=img_size,
            in_chans=in_chans,
            num_frames=num_frames,
            channels=channels,
            num_scales=num_scales,
            groups_per_scale=groups_per_scale,
            cells_per_group=cells_per_group,
            res_scale=res_scale,
        )
        self.img_size = to_2tuple(img_size)
        H, W = self.img_size
        if H % 2**num_scales or W % 2**num_scales:
            raise ValueError(f"img_size {self.img_size} must be divisible by 2^{num_scales}")
        if min(num_scales, groups_per_scale, cells_per_group) < 1:
            raise ValueError("num_scales, groups_per_scale and cells_per_group must be >= 1")
        self.in_chans = in_chans
        self.num_frames = num_frames
        self.num_scales = num_scales
        self.groups_per_scale = groups_per_scale
        self.num_latent_groups = num_scales * groups_per_scale
        # Channels of scale s (resolution H / 2^(s+1)): doubled at every down cell.
        self.scale_channels = [channels * 2 ** (s + 1) for s in range(num_scales)]
        self.embed_dim = self.scale_channels[-1]
        self.grid_size = (1, H // 2**num_scales, W // 2**num_scales)

        self.stem = Conv2d(in_chans * num_frames, channels, 3, padding=1)
        blocks: list[nn.Module] = []
        self._group_ends: list[int] = []  # index in blocks after which a group's feature is read
        c = channels
        for c_s in self.scale_channels:
            blocks.append(DownCell(c, c_s, res_scale))
            c = c_s
            for _ in range(groups_per_scale):
                blocks.extend(EncoderCell(c, res_scale) for _ in range(cells_per_group))
                self._group_ends.append(len(blocks) - 1)
        self.blocks = nn.ModuleList(blocks)
        self.norm = nn.LayerNorm(self.embed_dim, elementwise_affine=False)

    def stack_frames(self, x: Tensor) -> Tensor:
        """x: (B, C, T, H, W) -> (B, C * T, H, W), index c * T + t."""
        expected = (self.in_chans, self.num_frames, *self.img_size)
        if x.ndim != 5 or tuple(x.shape[1:]) != expected:
            raise ValueError(f"expected input (B, {', '.join(map(str, expected))}), got {x.shape}")
        return x.reshape(x.shape[0], -1, *self.img_size)

    def bottom_up(self, x: Tensor) -> list[Tensor]:
        """x: (B, C, T, H, W) -> per group, fine to coarse, the feature after its cells:
        (B, c_s, H / 2^(s+1), W / 2^(s+1)), groups_per_scale of them per scale s."""
        h = self.stem(self.stack_frames(x))
        features = []
        ends = set(self._group_ends)
        for i, block in enumerate(self.blocks):
            h = block(h)
            if i in ends:
                features.append(h)
        return features

    def forward_features(self, x: Tensor) -> Tensor:
        """x: (B, C, T, H, W) -> (B, 1 + h * w, embed_dim): the deepest map's positions as
        normalised tokens (row-major), after their mean as a first "cls" token."""
        tokens = self.norm(self.bottom_up(x)[-1].flatten(2).transpose(1, 2))
        return torch.cat([tokens.mean(dim=1, keepdim=True), tokens], dim=1)

    def forward(self, x: Tensor) -> Tensor:
        """x: (B, C, T, H, W) -> (B, 1 + h * w, embed_dim), as forward_features."""
        return self.forward_features(x)


# --------------------------------------------------------------------------------------------
# top-down decoder


class TopDown(nn.Module):
    """The generative path, and the posterior heads that condition on its state.

    Per group l (coarsest first): ``cells[l]`` (none for group 0, which starts from ``const``),
    ``prior[l]``: state -> (mu_p, logsig_p), ``posterior[l]``: (bottom-up feature, state) ->
    (dmu, dlogsig), ``combine[l]``: (state, z) -> state, then ``up[l]`` (an up cell after the
    last group of a scale, else identity). ``post`` and ``out`` map H/2 to H and the pixels.

    The top group's prior is N(0, I), as the paper's: a learned prior there could shrink
    or shift freely (the decoder absorbs any scale), which would leave the group's KL and
    its active-unit count without a fixed unit; ``prior[0]`` is an identity placeholder.
    """

    def __init__(
        self,
        out_chans: int,
        grid: tuple[int, int],
        channels: int,
        scale_channels: list[int],
        groups_per_scale: int,
        latent_channels: int,
        cells_per_group: int,
        expand: int,
        res_scale: float,
    ) -> None:
        super().__init__()
        S, g, L = len(scale_channels), groups_per_scale, latent_channels
        self.latent_channels = L
        self.const = nn.Parameter(torch.randn(1, scale_channels[-1], *grid))
        self.cells, self.prior, self.posterior = nn.ModuleList(), nn.ModuleList(), nn.ModuleList()
        self.combine, self.up = nn.ModuleList(), nn.ModuleList()
        for s in reversed(range(S)):
            c = scale_channels[s]
            for i in range(g):
                first = s == S - 1 and i == 0
                self.cells.append(
                    nn.Identity()
                    if first
                    else nn.Sequential(
                        *(DecoderCell(c, expand, res_scale) for _ in range(cells_per_group))
                    )
                )
                self.prior.append(
                    nn.Identity()
                    if first
                    else nn.Sequential(nn.ELU(), Conv2d(c, 2 * L, 3, padding=1))
                )
                self.posterior.append(nn.Sequential(nn.ELU(), Conv2d(2 * c, 2 * L, 3, padding=1)))
                self.combine.append(Conv2d(c + L, c, 1))
                last_of_scale = i == g - 1 and s > 0
                self.up.append(
                    UpCell(c, scale_channels[s - 1], expand, res_scale)
                    if last_of_scale
                    else nn.Identity()
                )
        self.post = nn.Sequential(
            UpCell(scale_channels[0], channels, expand, res_scale),
            DecoderCell(channels, expand, res_scale),
        )
        self.out = nn.Sequential(nn.ELU(), Conv2d(channels, 2 * out_chans, 3, padding=1))

    def forward(
        self,
        features: list[Tensor] | None,
        batch_size: int,
        temperature: float = 1.0,
        posterior_mean: bool = False,
    ) -> tuple[Tensor, Tensor, list[Tensor], list[Tensor]]:
        """features: per group, fine to coarse (B, c_s, h_s, w_s), or None to sample the prior
        -> pixel mean and log-scale (B, C * T, H, W), per-group KL (B, c_l, h_l, w_l)
        elementwise (empty without features), per-group z (B, latent_channels, h_l, w_l).

        With features, z is drawn from the posterior (its mean if `posterior_mean`); without,
        from the prior with its scale times `temperature`.
        """
        lo, hi = LATENT_LOGSIG_RANGE
        h = self.const.expand(batch_size, -1, -1, -1)
        kls, zs = [], []
        top_first = None if features is None else features[::-1]
        for g in range(len(self.prior)):
            h = self.cells[g](h)
            if g == 0:  # N(0, I)
                shape = (batch_size, self.latent_channels, *h.shape[2:])
                mu_p = logsig_p = torch.zeros(shape, device=h.device)
            else:
                mu_p, logsig_p = self.prior[g](h).float().chunk(2, dim=1)
                logsig_p = logsig_p.clamp(lo, hi)
            if top_first is None:
                z = mu_p + temperature * logsig_p.exp() * torch.randn_like(mu_p)
            else:
                q = self.posterior[g](torch.cat([top_first[g], h], dim=1))
                dmu, dlogsig = q.float().chunk(2, dim=1)
                # Residual normal: q = N(mu_p + dmu, sig_p * dsig), relative to the prior.
                mu_q, logsig_q = mu_p + dmu, (logsig_p + dlogsig).clamp(lo, hi)
                z = mu_q if posterior_mean else mu_q + logsig_q.exp() * torch.randn_like(mu_q)
                kls.append(kl_normal(mu_q, logsig_q, mu_p, logsig_p))
            zs.append(z)
            h = self.up[g](self.combine[g](torch.cat([h, z], dim=1)))
        # Densities in float32 also under bf16 autocast: sums over 10^6 pixels per sample.
        mu, logsig = self.out(self.post(h)).float().chunk(2, dim=1)
        return mu, logsig.clamp(*PIXEL_LOGSIG_RANGE), kls, zs


# --------------------------------------------------------------------------------------------
# the autoencoder


class NVAE(NVAEEncoder):
    """NVAE: the bottom-up encoder (inherited, so its weights are named as in NVAEEncoder) and
    the top-down decoder with ``num_scales * groups_per_scale`` latent groups.

    Likelihood: a heteroscedastic Gaussian, the decoder predicting a mean and a log-scale
    (clamped to [-4, 2]) per pixel. NVAE's discretised logistic mixture assumes 8-bit pixels;
    SDO channels here are continuous, z-scored and heavy-tailed, and the learned scale lets
    bright flare and limb pixels be less certain without their squared error dominating the
    loss. Losses are in nats per input dimension (C * T * H * W), averaged over the batch.
    """

    def __init__(
        self,
        img_size: int | tuple[int, int] = 64,
        in_chans: int = 12,
        num_frames: int = 1,
        channels: int = 32,
        num_scales: int = 2,
        groups_per_scale: int = 2,
        latent_channels: int = 8,
        cells_per_group: int = 1,
        expand: int = 3,
        res_scale: float = 0.1,
    ) -> None:
        super().__init__(
            img_size=img_size,
            in_chans=in_chans,
            num_frames=num_frames,
            channels=channels,
            num_scales=num_scales,
            groups_per_scale=groups_per_scale,
            cells_per_group=cells_per_group,
            res_scale=res_scale,
        )
        self.latent_channels = latent_channels
        self.decoder_net = TopDown(
            out_chans=in_chans * num_frames,
            grid=self.grid_size[1:],
            channels=channels,
            scale_channels=self.scale_channels,
            groups_per_scale=groups_per_scale,
            latent_channels=latent_channels,
            cells_per_group=cells_per_group,
            expand=expand,
            res_scale=res_scale,
        )
        H, W = self.img_size
        # Spatial size of each group, coarsest first, for the KL balancing.
        sizes = [
            (H // 2 ** (s + 1)) * (W // 2 ** (s + 1))
            for s in reversed(range(num_scales))
            for _ in range(groups_per_scale)
        ]
        self.register_buffer("group_sizes", torch.tensor(sizes, dtype=torch.float32), False)

    @property
    def num_dims(self) -> int:
        """Input dimensions per sample, C * T * H * W: the unit of the losses."""
        return self.in_chans * self.num_frames * self.img_size[0] * self.img_size[1]

    def unstack_frames(self, x: Tensor) -> Tensor:
        """x: (B, C * T, H, W) -> (B, C, T, H, W); the inverse of stack_frames."""
        return x.reshape(x.shape[0], self.in_chans, self.num_frames, *self.img_size)

    def forward(
        self, x: Tensor, kl_weight: float = 1.0, free_bits: float = 0.0
    ) -> dict[str, Tensor]:
        """x: (B, C, T, H, W) -> {"loss": (), "recon": (), "kl": (G,), "elbo": (),
        "x_hat": (B, C, T, H, W), "kl_coeffs": (G,), "recon_channels": (B, C)}.

        loss = recon + kl_weight * sum_l kl_coeffs[l] * max(kl[l], free_l); the coefficients
        are the KL balancing ones while kl_weight < 1 (the warm-up) and ones at kl_weight = 1.
        ``free_l`` is `free_bits` nats per latent variable of group l (Kingma et al. 2016's
        free bits on the batch-mean KL of each group): below it a group's KL costs nothing,
        so no group is pushed to zero information. All terms are nats per input dimension,
        batch means; ``kl`` and ``elbo`` are the true (unbalanced, unfloored) values.
        """
        mu, logsig, kls, _ = self.decoder_net(self.bottom_up(x), x.shape[0])
        target = self.stack_frames(x)
        D = self.num_dims
        nll = gaussian_nll(target, mu, logsig)
        recon = nll.sum(dim=(1, 2, 3)).mean() / D
        kl = torch.stack([k.sum(dim=(1, 2, 3)).mean() for k in kls]) / D
        if kl_weight < 1.0:
            per_latent = torch.stack([k.mean() for k in kls])
            coeffs = kl_balance_coeffs(per_latent, self.group_sizes)
        else:
            coeffs = torch.ones_like(kl)
        floor = free_bits * self.latent_channels * self.group_sizes / D
        loss = recon + kl_weight * (coeffs * torch.maximum(kl, floor)).sum()
        return {
            "loss": loss,
            "recon": recon,
            "kl": kl,
            "elbo": -(recon + kl.sum()),
            "x_hat": self.unstack_frames(mu),
            "kl_coeffs": coeffs,
            # nats per dimension of each sample's channels; their mean over both is recon
            "recon_channels": self.unstack_frames(nll).mean(dim=(2, 3, 4)),
        }

    @torch.no_grad()
    def posterior_means(self, x: Tensor) -> list[Tensor]:
        """x: (B, C, T, H, W) -> per group, coarsest first, the posterior means
        (B, latent_channels, h_l, w_l), each group conditioned on the means above it.
        Call in eval mode, so that batch norm uses its running statistics."""
        return self.decoder_net(self.bottom_up(x), x.shape[0], posterior_mean=True)[3]

    @torch.no_grad()
    def sample(self, n: int, temperature: float = 1.0) -> Tensor:
        """-> (n, C, T, H, W): the decoder's mean for z drawn from the prior with scales times
        `temperature` (0: the prior means, deterministic in eval mode)."""
        mu = self.decoder_net(None, n, temperature=temperature)[0]
        return self.unstack_frames(mu)

    def spectral_loss(self) -> Tensor:
        """-> (): the sum of the largest singular values of every convolution weight, one
        power iteration each per call in training (NVAE's spectral regularisation)."""
        terms = [m.spectral_norm(self.training) for m in self.modules() if isinstance(m, Conv2d)]
        return torch.stack(terms).sum()

    def encoder(self) -> NVAEEncoder:
        """A standalone :class:`NVAEEncoder` holding a copy of this model's bottom-up weights."""
        enc = NVAEEncoder(**self.encoder_config)
        missing, _ = enc.load_state_dict(self.state_dict(), strict=False)
        assert not missing, f"encoder weights missing from the autoencoder: {missing}"
        return enc.to(self.stem.weight.device)
