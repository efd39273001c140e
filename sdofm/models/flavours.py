"""Every registered model in one table: one row per model family, one row per flavour.

This module imports nothing heavy (no torch), so that configs validate model names without
importing torch; ``sdofm.models.get_model`` builds a flavour as the family's ``model`` class
called with ``{**flavour.args, **overrides}``.

To add a backbone: its model file under ``sdofm/models/``, its pretraining objective, one
``FAMILIES`` row naming them, and its flavours here, a debug-sized one first (the tests run
a forward and backward pass of every flavour). Nothing else branches on the family name.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Family:
    """One model family: where its pieces live, as ``"module:attribute"`` (imported when
    used, so that this table stays free of torch)."""

    model: str
    """The whole model trained in pretraining (``nn.Module``; its ``encoder()`` returns the
    encoder alone with its weights)."""
    encoder: str
    """The encoder the heads sit on, built from the checkpoint's ``encoder_config``; it takes
    (B, C, T, H, W) images and returns tokens on the patch grid."""
    objective: str
    """The pretraining objective (``sdofm.engine.Objective``) of this family."""
    head_ignores: tuple[str, ...]
    """Prefixes of the pretrained model's state-dict keys that an encoder leaves unused when
    it loads the checkpoint (the decoder); any other unused key is an error."""


FAMILIES: dict[str, Family] = {
    "mae": Family(
        model="sdofm.models.mae:MaskedAutoencoder",
        encoder="sdofm.models.mae:MAEEncoder",
        objective="sdofm.pretraining.objective:MaskedReconstruction",
        head_ignores=("decoder", "mask_token"),
    ),
    "nvae": Family(
        model="sdofm.models.nvae:NVAE",
        encoder="sdofm.models.nvae:NVAEEncoder",
        objective="sdofm.pretraining.objective:ELBO",
        head_ignores=("decoder_net",),
    ),
    "styleswin": Family(
        model="sdofm.models.styleswin:StyleSwin",
        encoder="sdofm.models.styleswin:StyleSwinEncoder",
        objective="sdofm.pretraining.styleswin:StyleSwinGAN",
        head_ignores=("G.", "G_ema.", "D.head."),
    ),
    "forecast": Family(
        model="sdofm.models.forecast:Forecaster",
        encoder="sdofm.models.forecast:ForecastEncoder",
        objective="sdofm.pretraining.forecast:Forecasting",
        head_ignores=("decoder", "mask_token", "fusion", "refine"),
    ),
}
"""Model family -> where its model, encoder and objective live."""
FEATURE_FAMILY = "mae"
"""The family whose pretrained encoder is the learned feature space in which generated
frames are scored (``sdofm.finetuning.generation``)."""


@dataclass(frozen=True)
class Flavour:
    """One size of one model family."""

    family: str
    """Model family, a key of ``FAMILIES`` (``"mae"``)."""
    args: Mapping[str, Any]
    """Constructor arguments of the family's model; ``get_model``'s overrides replace them."""


FLAVOURS: dict[str, Flavour] = {
    # Tiny MAE for tests: 32 px, patch 8, 12 channels, 32-dim, 2 blocks.
    "mae_debug": Flavour(
        "mae",
        {
            "img_size": 32,
            "patch_size": 8,
            "in_chans": 12,
            "embed_dim": 32,
            "depth": 2,
            "num_heads": 2,
            "decoder_embed_dim": 32,
            "decoder_depth": 1,
            "decoder_num_heads": 2,
        },
    ),
    # Small MAE: 128 px, patch 16, 12 channels, ViT-Ti encoder (192-dim, 6 blocks).
    "mae_tiny": Flavour(
        "mae",
        {
            "img_size": 128,
            "patch_size": 16,
            "in_chans": 12,
            "embed_dim": 192,
            "depth": 6,
            "num_heads": 3,
            "decoder_embed_dim": 128,
            "decoder_depth": 2,
            "decoder_num_heads": 4,
        },
    ),
    # SDO-FM's 32 M MAE: 512 px, patch 16, 9 AIA channels, 128-dim x 24 encoder.
    "mae_32m": Flavour(
        "mae",
        {
            "img_size": 512,
            "patch_size": 16,
            "in_chans": 9,
            "embed_dim": 128,
            "depth": 24,
            "num_heads": 16,
            "decoder_embed_dim": 512,
            "decoder_depth": 8,
            "decoder_num_heads": 16,
        },
    ),
    # SDO-FM's 104 M MAE: as mae_32m with a 512-dim encoder.
    "mae_104m": Flavour(
        "mae",
        {
            "img_size": 512,
            "patch_size": 16,
            "in_chans": 9,
            "embed_dim": 512,
            "depth": 24,
            "num_heads": 16,
            "decoder_embed_dim": 512,
            "decoder_depth": 8,
            "decoder_num_heads": 16,
        },
    ),
    # Temporal MAE as Prithvi: 3 frames, tubelet 1, 512 px, patch 16, 12 channels, 384-dim.
    "prithvi_temporal": Flavour(
        "mae",
        {
            "img_size": 512,
            "patch_size": 16,
            "num_frames": 3,
            "tubelet_size": 1,
            "in_chans": 12,
            "embed_dim": 384,
            "depth": 12,
            "num_heads": 6,
            "decoder_embed_dim": 256,
            "decoder_depth": 4,
            "decoder_num_heads": 8,
        },
    ),
    # Tiny NVAE for tests: 32 px, 12 channels, 2 scales x 2 groups of 4 latents; 0.12 M.
    "nvae_debug": Flavour(
        "nvae",
        {
            "img_size": 32,
            "in_chans": 12,
            "channels": 8,
            "num_scales": 2,
            "groups_per_scale": 2,
            "latent_channels": 4,
            "cells_per_group": 1,
        },
    ),
    # Small NVAE: 64 px, 12 channels, 3 scales (32, 16, 8 px) x 2 groups of 8 latents; 1.67 M.
    "nvae_tiny": Flavour(
        "nvae",
        {
            "img_size": 64,
            "in_chans": 12,
            "channels": 16,
            "num_scales": 3,
            "groups_per_scale": 2,
            "latent_channels": 8,
            "cells_per_group": 1,
        },
    ),
    # SDO-FM's 21.4 M NVAE at 512 px, 12 channels (9 AIA + 3 HMI): 4 scales (256 to 32 px,
    # 32 to 256 channels) x 4 groups of 24 latents, 2 cells per group; 21.21 M parameters.
    "nvae_21m": Flavour(
        "nvae",
        {
            "img_size": 512,
            "in_chans": 12,
            "channels": 16,
            "num_scales": 4,
            "groups_per_scale": 4,
            "latent_channels": 24,
            "cells_per_group": 2,
        },
    ),
    # Tiny StyleSwin for tests: 32 px, 12 channels, widths 32 (4 to 16 px) and 16 (32 px),
    # style 32, window 4 (shifted from 8 px); G 0.13 M, D 0.06 M.
    "styleswin_debug": Flavour(
        "styleswin",
        {
            "img_size": 32,
            "in_chans": 12,
            "style_dim": 32,
            "channel_base": 512,
            "channel_max": 32,
            "window_size": 4,
        },
    ),
    # Small StyleSwin: 64 px, 12 channels, widths 128 (4 to 32 px) and 64 (64 px), style 128,
    # window 8; G 2.48 M, D 1.18 M.
    "styleswin_tiny": Flavour(
        "styleswin",
        {
            "img_size": 64,
            "in_chans": 12,
            "style_dim": 128,
            "channel_base": 4096,
            "channel_max": 128,
        },
    ),
    # StyleSwin at 256 px as the paper's FFHQ/CelebA-HQ 256 model (channel multiplier 2:
    # widths 512 up to 64 px, 256 at 128, 128 at 256), style 512, window 8, 12 channels.
    "styleswin_256": Flavour(
        "styleswin",
        {
            "img_size": 256,
            "in_chans": 12,
            "style_dim": 512,
            "channel_base": 32768,
            "channel_max": 512,
        },
    ),
    # StyleSwin at 512 px: the 256 model's widths with one more stage (64 channels at 512).
    "styleswin_512": Flavour(
        "styleswin",
        {
            "img_size": 512,
            "in_chans": 12,
            "style_dim": 512,
            "channel_base": 32768,
            "channel_max": 512,
        },
    ),
    # Tiny forecaster for tests: 32 px, patch 8, 12 channels, 2 input frames + 1 lead,
    # 32-dim encoder of 2 blocks, decoder of 1.
    "forecast_debug": Flavour(
        "forecast",
        {
            "img_size": 32,
            "patch_size": 8,
            "num_frames": 3,
            "leads": 1,
            "in_chans": 12,
            "embed_dim": 32,
            "depth": 2,
            "num_heads": 2,
            "decoder_embed_dim": 32,
            "decoder_depth": 1,
            "decoder_num_heads": 2,
        },
    ),
    # Small forecaster: 128 px, patch 16, 12 channels, frames t - 1 h and t -> t + 1 h;
    # 128-dim encoder of 4 blocks (joint space-time attention), decoder 128-dim x 2.
    "forecast_tiny": Flavour(
        "forecast",
        {
            "img_size": 128,
            "patch_size": 16,
            "num_frames": 3,
            "leads": 1,
            "in_chans": 12,
            "embed_dim": 128,
            "depth": 4,
            "num_heads": 4,
            "decoder_embed_dim": 128,
            "decoder_depth": 2,
            "decoder_num_heads": 4,
        },
    ),
    # Forecaster at SDOML's 512 px, 20 M: Surya's inputs (t - 1 h, t), the 32 M MAE's encoder
    # (128-dim x 24, patch 16), 9 AIA + 3 HMI channels; decoder 512-dim x 4.
    "forecast_20m": Flavour(
        "forecast",
        {
            "img_size": 512,
            "patch_size": 16,
            "num_frames": 3,
            "leads": 1,
            "in_chans": 12,
            "embed_dim": 128,
            "depth": 24,
            "num_heads": 16,
            "decoder_embed_dim": 512,
            "decoder_depth": 4,
            "decoder_num_heads": 16,
        },
    ),
}
"""Flavour name -> model family and constructor arguments; ``sdofm.models.list_models()``."""
