"""Forecaster: the Sun ``dt`` ahead from frames at ``t - (T-1) dt .. t``, rolled out over
``leads`` steps.

A ViT encoder (the MAE's, so its weights serve the heads as the MAE's do) embeds the ``T``
input frames as tokens on a (T, h, w) grid with joint space-time attention; optional
random masking of the input tokens acts as augmentation. A temporal fusion maps each patch
location's ``T`` tokens to one, a light decoder attends over the fused grid, and its
prediction is the change of each patch from the last input frame: with the prediction
layer initialised at zero the untrained model forecasts persistence, so training starts
from the first baseline and learns what the Sun does in ``dt``. A pixel-scale refinement
(two 3 x 3 convolutions over the input frames, the decoder's change and the position on
the image) adds what patches of 16 px cannot say: sub-pixel motion and the noise of a
single frame.

Longer leads roll out: the prediction is appended to the inputs (the oldest dropped) and
the model predicts again, as Surya does. The loss is the squared error on the solar disk
(pixels within the disk radius), per channel, averaged over channels and leads; off the
disk the forecast is persistence.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from sdofm.models.mae import MAEEncoder, Masking, _init_weights, disk_radius
from sdofm.models.vit import Block, sincos_pos_embed_2d


class ForecastEncoder(MAEEncoder):
    """The forecaster's encoder: an :class:`MAEEncoder` over the ``num_frames`` input frames
    (its own class, so a checkpoint's encoder is known as the forecaster's)."""


def disk_pixels(img_size: tuple[int, int]) -> Tensor:
    """-> (H, W) bool: pixels whose centre lies within the solar disk radius of the image
    centre (the geometry of :mod:`sdofm.datasets.rotation`)."""
    H, W = img_size
    r = disk_radius(img_size)
    y = torch.arange(H, dtype=torch.float64) - (H - 1) / 2
    x = torch.arange(W, dtype=torch.float64) - (W - 1) / 2
    return (y[:, None] ** 2 + x[None, :] ** 2) < r * r


class Forecaster(ForecastEncoder):
    """Encoder (inherited: checkpoints name its weights as :class:`ForecastEncoder` does),
    temporal fusion and decoder predicting the next frame of every channel.

    ``num_frames`` is the window of a sample, inputs then targets (``data.num_frames``);
    the encoder sees the first ``num_frames - leads``.
    """

    def __init__(
        self,
        img_size: int | tuple[int, int] = 512,
        patch_size: int = 16,
        num_frames: int = 3,
        leads: int = 1,
        in_chans: int = 9,
        embed_dim: int = 128,
        depth: int = 12,
        num_heads: int = 8,
        decoder_embed_dim: int = 256,
        decoder_depth: int = 4,
        decoder_num_heads: int = 8,
        mlp_ratio: float = 4.0,
        masking: Masking = "random",
        mask_ratio: float = 0.0,
        refine_channels: int = 32,
    ) -> None:
        if not 1 <= leads < num_frames:
            raise ValueError(
                f"a window of {num_frames} frames holds {leads} leads and at least one input "
                "frame: set data.num_frames to the input frames plus model leads"
            )
        if not 0.0 <= mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
        inputs = num_frames - leads
        super().__init__(
            img_size=img_size,
            patch_size=patch_size,
            num_frames=inputs,
            tubelet_size=1,
            in_chans=in_chans,
            embed_dim=embed_dim,
            depth=depth,
            num_heads=num_heads,
            mlp_ratio=mlp_ratio,
            masking=masking,
        )
        self.inputs, self.leads, self.window = inputs, leads, num_frames
        self.mask_ratio = mask_ratio
        _, h, w = self.grid_size
        self.grid_2d = (h, w)
        D = decoder_embed_dim
        self.decoder_embed = nn.Linear(embed_dim, D)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, D))
        self.fusion = nn.Linear(inputs * D, D)
        self.register_buffer(
            "decoder_pos_embed", sincos_pos_embed_2d(D, h, w).unsqueeze(0), persistent=False
        )
        self.decoder_blocks = nn.ModuleList(
            Block(D, decoder_num_heads, mlp_ratio) for _ in range(decoder_depth)
        )
        self.decoder_norm = nn.LayerNorm(D, eps=1e-6)
        self.decoder_pred = nn.Linear(D, patch_size * patch_size * in_chans)
        self.register_buffer("disk", disk_pixels(self.img_size), persistent=False)
        # Pixel-scale refinement: the input frames, the decoder's change and the position on
        # the disk through two 3 x 3 convolutions (sub-pixel motion, noise), zero at start.
        H, W = self.img_size
        y = torch.linspace(-1.0, 1.0, H)[:, None].expand(H, W)
        x = torch.linspace(-1.0, 1.0, W)[None, :].expand(H, W)
        self.register_buffer("coords", torch.stack([x, y]).unsqueeze(0), persistent=False)
        self.refine = nn.Sequential(
            nn.Conv2d(in_chans * (inputs + 1) + 2, refine_channels, 3, padding=1),
            nn.GELU(),
            nn.Conv2d(refine_channels, in_chans, 3, padding=1),
        )

        nn.init.normal_(self.mask_token, std=0.02)
        for module in (self.decoder_embed, self.fusion, self.decoder_blocks, self.decoder_norm):
            module.apply(_init_weights)
        for last in (self.decoder_pred, self.refine[-1]):  # persistence at initialisation
            nn.init.zeros_(last.weight)
            nn.init.zeros_(last.bias)

    def unpatchify_2d(self, x: Tensor) -> Tensor:
        """x: (B, h * w, p * p * C) -> (B, C, H, W), pixels ordered (p, q, c) in a patch."""
        B = x.shape[0]
        (h, w), p, C = self.grid_2d, self.patch_size, self.in_chans
        x = x.reshape(B, h, w, p, p, C).permute(0, 5, 1, 3, 2, 4)  # (B, C, h, p, w, q)
        return x.reshape(B, C, h * p, w * p)

    def step(self, frames: Tensor, mask_ratio: float = 0.0) -> Tensor:
        """frames: (B, C, T, H, W) the inputs -> (B, C, H, W) the next frame."""
        latent, _, ids_restore = self.forward_encoder(frames, mask_ratio)
        x = self.decoder_embed(latent[:, 1:])
        B, L = ids_restore.shape
        if x.shape[1] < L:  # masked tokens back in place as the mask token
            x = torch.cat([x, self.mask_token.expand(B, L - x.shape[1], -1)], dim=1)
            x = torch.gather(x, 1, ids_restore.unsqueeze(-1).expand(-1, -1, x.shape[2]))
        n = self.grid_2d[0] * self.grid_2d[1]
        x = x.reshape(B, self.inputs, n, -1).permute(0, 2, 1, 3).reshape(B, n, -1)
        x = self.fusion(x) + self.decoder_pos_embed
        for block in self.decoder_blocks:
            x = block(x)
        change = self.unpatchify_2d(self.decoder_pred(self.decoder_norm(x))).to(frames.dtype)
        B, C, T, H, W = frames.shape
        pixels = [frames.reshape(B, C * T, H, W), change, self.coords.expand(B, -1, -1, -1)]
        change = change + self.refine(torch.cat([p.to(frames.dtype) for p in pixels], dim=1))
        # Off the disk (the corona, which the loss leaves out) the forecast is persistence.
        return frames[:, :, -1] + change * self.disk.to(change.dtype)

    def rollout(self, inputs: Tensor, leads: int | None = None, mask_ratio: float = 0.0) -> Tensor:
        """inputs: (B, C, T, H, W) -> (B, C, leads, H, W): leads 1.. ``leads`` (default the
        model's), each predicted from the newest ``T`` frames, predictions included."""
        frames, preds = inputs, []
        for _ in range(self.leads if leads is None else leads):
            nxt = self.step(frames, mask_ratio)
            preds.append(nxt)
            frames = torch.cat([frames[:, :, 1:], nxt.unsqueeze(2)], dim=2)
        return torch.stack(preds, dim=2)

    def disk_errors(self, pred: Tensor, target: Tensor) -> Tensor:
        """pred, target: (B, C, leads, H, W) -> (B, C, leads): mean squared error on the disk."""
        err = (pred.float() - target.float()).pow(2)[..., self.disk]
        return err.mean(dim=-1)

    def forward(self, imgs: Tensor, mask_ratio: float | None = None) -> dict[str, Tensor]:
        """imgs: (B, C, window, H, W), inputs then targets -> {"loss": (), "pred": (B, C,
        leads, H, W), "errors": (B, C, leads) squared error on the disk}."""
        if imgs.shape[2] != self.window:
            raise ValueError(
                f"samples of {imgs.shape[2]} frames; this forecaster takes {self.inputs} inputs "
                f"and {self.leads} leads ({self.window} frames)"
            )
        mask_ratio = self.mask_ratio if mask_ratio is None else mask_ratio
        pred = self.rollout(imgs[:, :, : self.inputs], mask_ratio=mask_ratio)
        errors = self.disk_errors(pred, imgs[:, :, self.inputs :])
        return {"loss": errors.mean(), "pred": pred, "errors": errors}

    def encoder(self) -> ForecastEncoder:
        """A standalone :class:`ForecastEncoder` with a copy of this model's encoder weights."""
        return self.standalone(ForecastEncoder)
