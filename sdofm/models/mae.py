"""Masked autoencoder (He et al. 2022) over image sequences, as the Prithvi temporal MAE.

Input is ``imgs: (B, C, T, H, W)``; a single image is T = 1 with tubelet size 1. Tubelets of
``tubelet_size x patch_size x patch_size`` pixels become L tokens, ordered time-major, then row,
then column. The encoder sees the kept tokens only; the decoder fills the others with a learned
mask token and predicts the pixels of every patch; the loss is the MSE on masked patches.

Masks follow MAE: ``mask: (B, L)``, 1 = removed from the encoder, 0 = kept. ``ids_shuffle`` is a
per-sample permutation of range(L) with the kept tokens first; ``ids_restore`` is its inverse.

Masking strategies (``masking=``):

* ``"random"``: uniform, as MAE.
* ``"disk"``: patches whose centre lies off the solar disk (radius 204/512 of the image) are
  always removed and carry no loss; ``mask_ratio`` applies to the on-disk patches.
* ``"solar"``: as ``"disk"``, and on-disk patches are masked with probability weighted by an
  active-region latitude prior, ``w = 1 + exp(-(|lat| - 15.7)^2 / (2 * 6.1^2))``, lat in deg.

The encoder weights have the same names in ``MAEEncoder`` and ``MaskedAutoencoder``, so an
encoder loads from a pretrained checkpoint with ``load_state_dict(sd, strict=False)``.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

from sdofm.constants import disk_radius_px
from sdofm.models.vit import (
    Block,
    TubeletEmbed3D,
    sincos_pos_embed_2d,
    sincos_pos_embed_3d,
    to_2tuple,
)

Masking = Literal["random", "disk", "solar"]
MASKING_STRATEGIES: tuple[str, ...] = ("random", "disk", "solar")

ACTIVE_LATITUDE_DEG = (15.7, 6.1)
"""Mean and standard deviation of the |latitude| of active regions, deg."""


# --------------------------------------------------------------------------------------------
# solar-disk geometry of the patch grid


def patch_centres(img_size: int | tuple[int, int], patch_size: int) -> tuple[Tensor, Tensor]:
    """-> (y, x), each (h * w,): patch centres in pixels from the image centre (y grows with the row)."""
    H, W = to_2tuple(img_size)
    y = (torch.arange(H // patch_size, dtype=torch.float64) + 0.5) * patch_size - H / 2
    x = (torch.arange(W // patch_size, dtype=torch.float64) + 0.5) * patch_size - W / 2
    yy, xx = torch.meshgrid(y, x, indexing="ij")
    return yy.flatten(), xx.flatten()


def disk_radius(img_size: int | tuple[int, int]) -> float:
    """Solar disk radius in pixels, centred in an image of `img_size`."""
    return disk_radius_px(min(to_2tuple(img_size)))


def on_disk_patches(img_size: int | tuple[int, int], patch_size: int) -> Tensor:
    """-> (h * w,) bool: True where the patch centre lies on the solar disk."""
    y, x = patch_centres(img_size, patch_size)
    return y**2 + x**2 <= disk_radius(img_size) ** 2


def patch_latitudes(img_size: int | tuple[int, int], patch_size: int) -> Tensor:
    """-> (h * w,) float64: heliographic latitude of each patch centre, deg, arcsin(y / R).

    Images are in FITS order as SDOML (row 0 south), so y grows with the row. Off-disk
    patches are clamped to +-90 deg.
    """
    y, _ = patch_centres(img_size, patch_size)
    return torch.rad2deg(torch.asin((y / disk_radius(img_size)).clamp(-1.0, 1.0)))


def active_latitude_weights(lat_deg: Tensor) -> Tensor:
    """lat_deg: (...) -> (...) in [1, 2]: 1 + the peak-normalised N(15.7, 6.1) pdf of |lat|."""
    mean, std = ACTIVE_LATITUDE_DEG
    return 1.0 + torch.exp(-0.5 * ((lat_deg.abs() - mean) / std) ** 2)


# --------------------------------------------------------------------------------------------
# helpers


def pos_embed_with_cls(dim: int, grid_size: tuple[int, int, int]) -> Tensor:
    """grid_size: (t, h, w) -> (1, 1 + t * h * w, dim): zeros for the cls token, then sin-cos."""
    t, h, w = grid_size
    # A single time step carries no position: give all dimensions to space, as the 2-D MAE.
    pe = sincos_pos_embed_2d(dim, h, w) if t == 1 else sincos_pos_embed_3d(dim, t, h, w)
    return torch.cat([torch.zeros(1, dim), pe], dim=0).unsqueeze(0)


def _init_weights(m: nn.Module) -> None:
    """MAE init: xavier-uniform linear layers with zero bias, unit LayerNorms."""
    if isinstance(m, nn.Linear):
        nn.init.xavier_uniform_(m.weight)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


def masked_loss(pred: Tensor, target: Tensor, mask: Tensor) -> Tensor:
    """pred, target: (B, L, P), mask: (B, L) weights, 1 = masked -> scalar.

    Mean squared error per patch, averaged over the masked patches.
    """
    loss = (pred - target).pow(2).mean(dim=-1)
    return (loss * mask).sum() / mask.sum()


# --------------------------------------------------------------------------------------------
# encoder


class MAEEncoder(nn.Module):
    """ViT encoder of the MAE: tubelet embedding, sin-cos positions, cls token, blocks, norm."""

    def __init__(
        self,
        img_size: int | tuple[int, int] = 512,
        patch_size: int = 16,
        num_frames: int = 1,
        tubelet_size: int = 1,
        in_chans: int = 9,
        embed_dim: int = 128,
        depth: int = 24,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        masking: Masking = "random",
    ) -> None:
        super().__init__()
        # The constructor arguments, so that a standalone encoder can be rebuilt (encoder()).
        self.encoder_config = dict(
            img_size=img_size,
            patch_size=patch_size,
            num_frames=num_frames,
            tubelet_size=tubelet_size,
            in_chans=in_chans,
            embed_dim=embed_dim,
            depth=depth,
            num_heads=num_heads,
            mlp_ratio=mlp_ratio,
            masking=masking,
        )
        if masking not in MASKING_STRATEGIES:
            raise ValueError(f"unknown masking {masking!r}, expected one of {MASKING_STRATEGIES}")
        self.masking = masking
        self.img_size = to_2tuple(img_size)
        self.patch_size = patch_size
        self.num_frames = num_frames
        self.tubelet_size = tubelet_size
        self.in_chans = in_chans
        self.embed_dim = embed_dim

        self.patch_embed = TubeletEmbed3D(
            img_size, patch_size, num_frames, tubelet_size, in_chans, embed_dim
        )
        self.grid_size = self.patch_embed.grid_size
        self.num_patches = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        # Fixed and rebuilt from the config, so kept out of checkpoints.
        self.register_buffer(
            "pos_embed", pos_embed_with_cls(embed_dim, self.grid_size), persistent=False
        )
        self.blocks = nn.ModuleList(Block(embed_dim, num_heads, mlp_ratio) for _ in range(depth))
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)

        grid_t = self.grid_size[0]
        lat = patch_latitudes(img_size, patch_size)
        self.register_buffer(
            "on_disk", on_disk_patches(img_size, patch_size).repeat(grid_t), persistent=False
        )
        self.register_buffer(
            "mask_weight", active_latitude_weights(lat).float().repeat(grid_t), persistent=False
        )
        self.num_on_disk = int(self.on_disk.sum())

        w = self.patch_embed.proj.weight
        nn.init.xavier_uniform_(w.data.view(w.shape[0], -1))
        nn.init.normal_(self.cls_token, std=0.02)
        self.blocks.apply(_init_weights)
        self.norm.apply(_init_weights)

    # -- masking ------------------------------------------------------------------------------

    def num_keep(self, mask_ratio: float) -> int:
        """Tokens the encoder keeps: round(n * (1 - mask_ratio)), n = L or the on-disk count."""
        if not 0.0 <= mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
        n = self.num_patches if self.masking == "random" else self.num_on_disk
        return round(n * (1.0 - mask_ratio))

    def masking_noise(self, batch_size: int, generator: torch.Generator | None = None) -> Tensor:
        """-> (B, L) sort keys: the tokens with the smallest keys are kept.

        "disk" and "solar" give off-disk tokens keys in [1, 2), above every on-disk key.
        "solar" uses log(u) / w (Efraimidis-Spirakis): the masked set, the largest keys, is a
        sample without replacement with probability proportional to the weight w.
        ``generator``: a CPU generator to draw from (fixed masks), else the global one.
        """
        if generator is None:
            u = torch.rand(batch_size, self.num_patches, device=self.on_disk.device)
        else:
            u = torch.rand(batch_size, self.num_patches, generator=generator)
            u = u.to(self.on_disk.device)
        if self.masking == "random":
            return u
        noise = u.log() / self.mask_weight if self.masking == "solar" else u
        return torch.where(self.on_disk, noise, 1.0 + u)

    def random_masking(
        self, batch_size: int, mask_ratio: float, ids_shuffle: Tensor | None = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """-> ids_keep (B, L_keep), mask (B, L), ids_restore (B, L).

        ids_shuffle: (B, L) permutations of range(L), kept tokens first; drawn per sample from
        the masking strategy when None.
        """
        if ids_shuffle is None:
            ids_shuffle = torch.argsort(self.masking_noise(batch_size), dim=1)
        ids_restore = torch.argsort(ids_shuffle, dim=1)
        len_keep = self.num_keep(mask_ratio)
        mask = torch.ones(ids_shuffle.shape, device=ids_shuffle.device)
        mask[:, :len_keep] = 0
        return ids_shuffle[:, :len_keep], torch.gather(mask, 1, ids_restore), ids_restore

    # -- forward ------------------------------------------------------------------------------

    def forward_encoder(
        self, x: Tensor, mask_ratio: float = 0.0, ids_shuffle: Tensor | None = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """x: (B, C, T, H, W) -> latent (B, 1 + L_keep, D), mask (B, L), ids_restore (B, L).

        With mask_ratio = 0 and no ids_shuffle every token is kept, in order.
        """
        x = self.patch_embed(x) + self.pos_embed[:, 1:]
        B, L, D = x.shape
        if mask_ratio == 0.0 and ids_shuffle is None:
            mask = x.new_zeros(B, L)
            ids_restore = torch.arange(L, device=x.device).repeat(B, 1)
        else:
            ids_keep, mask, ids_restore = self.random_masking(B, mask_ratio, ids_shuffle)
            x = torch.gather(x, 1, ids_keep.unsqueeze(-1).expand(-1, -1, D))

        cls = (self.cls_token + self.pos_embed[:, :1]).expand(B, -1, -1)
        x = torch.cat([cls, x], dim=1)
        for block in self.blocks:
            x = block(x)
        return self.norm(x), mask, ids_restore

    def forward(
        self, x: Tensor, mask_ratio: float = 0.0, ids_shuffle: Tensor | None = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """x: (B, C, T, H, W) -> latent (B, 1 + L_keep, D), mask (B, L), ids_restore (B, L)."""
        return self.forward_encoder(x, mask_ratio, ids_shuffle)

    def forward_features(self, x: Tensor) -> Tensor:
        """x: (B, C, T, H, W) -> (B, 1 + L, D): cls token, then every patch token, in order."""
        return self.forward_encoder(x, 0.0)[0]

    def standalone(self, cls: type[MAEEncoder]) -> MAEEncoder:
        """A standalone encoder of class ``cls`` holding a copy of this model's encoder weights
        (the whole models subclass the encoder, so its weights keep their names)."""
        enc = cls(**self.encoder_config)
        missing, _ = enc.load_state_dict(self.state_dict(), strict=False)
        assert not missing, f"encoder weights missing from {type(self).__name__}: {missing}"
        return enc.to(self.cls_token.device)


# --------------------------------------------------------------------------------------------
# masked autoencoder


class MaskedAutoencoder(MAEEncoder):
    """MAE: the encoder (inherited, so checkpoints name its weights as MAEEncoder does) and a
    lighter decoder that predicts the pixels of every patch from the kept tokens.
    """

    def __init__(
        self,
        img_size: int | tuple[int, int] = 512,
        patch_size: int = 16,
        num_frames: int = 1,
        tubelet_size: int = 1,
        in_chans: int = 9,
        embed_dim: int = 128,
        depth: int = 24,
        num_heads: int = 16,
        decoder_embed_dim: int = 512,
        decoder_depth: int = 8,
        decoder_num_heads: int = 16,
        mlp_ratio: float = 4.0,
        norm_pix_loss: bool = False,
        masking: Masking = "random",
        mask_ratio: float = 0.75,
        restore_head: bool = False,
    ) -> None:
        super().__init__(
            img_size=img_size,
            patch_size=patch_size,
            num_frames=num_frames,
            tubelet_size=tubelet_size,
            in_chans=in_chans,
            embed_dim=embed_dim,
            depth=depth,
            num_heads=num_heads,
            mlp_ratio=mlp_ratio,
            masking=masking,
        )
        if not 0.0 < mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be in (0, 1), got {mask_ratio}")
        self.mask_ratio = mask_ratio
        self.norm_pix_loss = norm_pix_loss

        self.decoder_embed = nn.Linear(embed_dim, decoder_embed_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
        self.register_buffer(
            "decoder_pos_embed",
            pos_embed_with_cls(decoder_embed_dim, self.grid_size),
            persistent=False,
        )
        self.decoder_blocks = nn.ModuleList(
            Block(decoder_embed_dim, decoder_num_heads, mlp_ratio) for _ in range(decoder_depth)
        )
        self.decoder_norm = nn.LayerNorm(decoder_embed_dim, eps=1e-6)
        self.patch_dim = tubelet_size * patch_size * patch_size * in_chans
        self.decoder_pred = nn.Linear(decoder_embed_dim, self.patch_dim)
        # A second prediction of each masked patch: the sample before a dimming the input
        # went through (``forward``'s ``restored``); the encoder is unchanged.
        self.decoder_pred_restored = (
            nn.Linear(decoder_embed_dim, self.patch_dim) if restore_head else None
        )

        nn.init.normal_(self.mask_token, std=0.02)
        for module in (self.decoder_embed, self.decoder_blocks, self.decoder_norm):
            module.apply(_init_weights)
        self.decoder_pred.apply(_init_weights)
        if self.decoder_pred_restored is not None:
            self.decoder_pred_restored.apply(_init_weights)

    # -- patches ------------------------------------------------------------------------------

    def patchify(self, imgs: Tensor) -> Tensor:
        """imgs: (B, C, T, H, W) -> (B, L, tubelet * p * p * C), pixels ordered (u, p, q, c)."""
        B, C = imgs.shape[:2]
        t, h, w = self.grid_size
        u, p = self.tubelet_size, self.patch_size
        x = imgs.reshape(B, C, t, u, h, p, w, p)
        x = x.permute(0, 2, 4, 6, 3, 5, 7, 1)  # (B, t, h, w, u, p, q, C)
        return x.reshape(B, t * h * w, u * p * p * C)

    def unpatchify(self, x: Tensor) -> Tensor:
        """x: (B, L, tubelet * p * p * C) -> imgs (B, C, T, H, W); the inverse of patchify."""
        B = x.shape[0]
        t, h, w = self.grid_size
        u, p, C = self.tubelet_size, self.patch_size, self.in_chans
        x = x.reshape(B, t, h, w, u, p, p, C)
        x = x.permute(0, 7, 1, 4, 2, 5, 3, 6)  # (B, C, t, u, h, p, w, q)
        return x.reshape(B, C, t * u, h * p, w * p)

    # -- forward ------------------------------------------------------------------------------

    def forward_decoder(self, latent: Tensor, ids_restore: Tensor) -> Tensor:
        """latent: (B, 1 + L_keep, D), ids_restore: (B, L) -> (B, L, D_dec): the decoder's
        normalised output per patch, which ``decoder_pred`` turns into pixels."""
        x = self.decoder_embed(latent)
        B, L = ids_restore.shape
        mask_tokens = self.mask_token.expand(B, L + 1 - x.shape[1], -1)
        x_ = torch.cat([x[:, 1:], mask_tokens], dim=1)  # shuffled order
        x_ = torch.gather(x_, 1, ids_restore.unsqueeze(-1).expand(-1, -1, x.shape[2]))
        x = torch.cat([x[:, :1], x_], dim=1) + self.decoder_pos_embed

        for block in self.decoder_blocks:
            x = block(x)
        return self.decoder_norm(x)[:, 1:]

    def loss_weights(self, mask: Tensor) -> Tensor:
        """mask: (B, L) -> (B, L): the mask, with off-disk patches at 0 for "disk" and "solar"."""
        if self.masking == "random":
            return mask
        return mask * self.on_disk.to(mask.dtype)

    def loss_target(self, imgs: Tensor) -> Tensor:
        """imgs: (B, C, T, H, W) -> (B, L, P): the patches, normalised per patch with norm_pix_loss."""
        target = self.patchify(imgs)
        if self.norm_pix_loss:
            mean = target.mean(dim=-1, keepdim=True)
            var = target.var(dim=-1, keepdim=True)
            target = (target - mean) / (var + 1.0e-6) ** 0.5
        return target

    def forward_loss(self, imgs: Tensor, pred: Tensor, mask: Tensor) -> Tensor:
        """imgs: (B, C, T, H, W), pred: (B, L, P), mask: (B, L) -> scalar MSE on masked patches."""
        return masked_loss(pred, self.loss_target(imgs), self.loss_weights(mask))

    def channel_errors(self, imgs: Tensor, pred: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        """imgs: (B, C, T, H, W), pred: (B, L, P), mask: (B, L) -> (B, C) sums, (B,) weights.

        Squared error per sample and channel summed over the masked patches (each patch's
        mean over its pixels), and each sample's summed patch weight: summed over samples,
        ``sums / weight`` is the loss of each channel, and their mean is ``forward_loss``.
        Sums let samples, shards and batches be added up exactly.
        """
        C = self.in_chans
        err = (pred - self.loss_target(imgs)).pow(2)
        err = err.reshape(*err.shape[:2], -1, C).mean(dim=2)  # (B, L, C): channel is last in P
        w = self.loss_weights(mask)
        return (err * w.unsqueeze(-1)).sum(dim=1), w.sum(dim=1)

    def reconstruct(self, imgs: Tensor, pred: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        """-> (masked input, reconstruction), both (B, C, T, H, W) in the units of ``imgs``.

        The reconstruction shows the predicted pixels of masked patches and the input elsewhere.
        """
        patches = self.patchify(imgs)
        if self.norm_pix_loss:  # undo the per-patch normalisation of the targets
            mean = patches.mean(dim=-1, keepdim=True)
            std = (patches.var(dim=-1, keepdim=True) + 1.0e-6) ** 0.5
            pred = pred * std + mean
        m = mask.unsqueeze(-1).to(patches.dtype)
        masked = self.unpatchify(patches * (1 - m))
        recon = self.unpatchify(patches * (1 - m) + pred.to(patches.dtype) * m)
        return masked, recon

    def encoder(self) -> MAEEncoder:
        """A standalone :class:`MAEEncoder` holding a copy of this model's encoder weights."""
        return self.standalone(MAEEncoder)

    def forward(
        self,
        imgs: Tensor,
        mask_ratio: float | None = None,
        ids_shuffle: Tensor | None = None,
        target: Tensor | None = None,
        restored: Tensor | None = None,
    ) -> dict[str, Tensor]:
        """imgs: (B, C, T, H, W) -> {"loss": (), "pred": (B, L, P), "mask": (B, L)}.

        ids_shuffle: (B, L) fixed masks (see ``random_masking``), else drawn. target: what
        the masked patches are scored against, the shape of ``imgs`` (default: ``imgs``).
        restored: with ``restore_head``, the sample before the dimming ``imgs`` went
        through; the second head predicts its masked patches ("pred_restored") and the
        loss is the mean of both heads' losses."""
        mask_ratio = self.mask_ratio if mask_ratio is None else mask_ratio
        if not 0.0 < mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be in (0, 1) to train, got {mask_ratio}")
        latent, mask, ids_restore = self.forward_encoder(imgs, mask_ratio, ids_shuffle)
        hidden = self.forward_decoder(latent, ids_restore)
        pred = self.decoder_pred(hidden)
        loss = self.forward_loss(imgs if target is None else target, pred, mask)
        out = {"loss": loss, "pred": pred, "mask": mask}
        if restored is not None:
            if self.decoder_pred_restored is None:
                raise ValueError("restored needs a model built with restore_head=True")
            out["pred_restored"] = self.decoder_pred_restored(hidden)
            out["loss"] = (loss + self.forward_loss(restored, out["pred_restored"], mask)) / 2
        return out


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters (the fixed position embeddings are buffers)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
