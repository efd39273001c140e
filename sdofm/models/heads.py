"""Science heads on a pretrained encoder, and the from-scratch CNN baselines.

Regressors map images ``(B, C, T, H, W)`` to ``(B, K)`` values: in (0, 1) with ``squash``
(sigmoid outputs: dimming factors for autocalibration), unbounded without (standardised
log irradiances for virtual EVE). Reconstructors map them to ``(B, K, T, H, W)`` images
(held-out channels).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

Freeze = Literal["frozen", "partial", "full"]


class PoolHead(nn.Module):
    """Mean of the patch tokens -> MLP. tokens: (B, 1 + L, D) -> (B, K)."""

    def __init__(self, dim: int, out: int, hidden: int = 256) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, out))

    def forward(self, tokens: Tensor, grid: tuple[int, int, int]) -> Tensor:
        return self.mlp(self.norm(tokens[:, 1:].mean(dim=1)))


class ConvHead(nn.Module):
    """Patch tokens back on their (h, w) grid (mean over time) -> two 3x3 convolutions ->
    global average -> linear. tokens: (B, 1 + L, D) -> (B, K)."""

    def __init__(self, dim: int, out: int, hidden: int = 256) -> None:
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(dim, hidden, 3, padding=1),
            nn.GELU(),
            nn.Conv2d(hidden, hidden, 3, padding=1),
            nn.GELU(),
        )
        self.fc = nn.Linear(hidden, out)

    def forward(self, tokens: Tensor, grid: tuple[int, int, int]) -> Tensor:
        t, h, w = grid
        B, _, D = tokens.shape
        x = tokens[:, 1:].reshape(B, t, h, w, D).mean(dim=1).permute(0, 3, 1, 2)  # (B, D, h, w)
        return self.fc(self.conv(x).mean(dim=(2, 3)))


class LinearHead(nn.Module):
    """The linear probe of MAE (He et al. 2022): mean of the patch tokens -> BatchNorm
    without affine parameters (each feature standardised over the data) -> one linear
    layer. tokens: (B, 1 + L, D) -> (B, K); ``hidden`` is unused."""

    def __init__(self, dim: int, out: int, hidden: int = 0) -> None:
        super().__init__()
        self.norm = nn.BatchNorm1d(dim, affine=False, eps=1e-6)
        self.fc = nn.Linear(dim, out)

    def forward(self, tokens: Tensor, grid: tuple[int, int, int]) -> Tensor:
        return self.fc(self.norm(tokens[:, 1:].mean(dim=1)))


HEADS = {"pool": PoolHead, "conv": ConvHead, "linear": LinearHead}


class DenseHead(nn.Module):
    """Patch tokens on their (h, w) grid, per time slice -> two 3x3 convolutions -> the
    pixels of every token's patch. tokens: (B, 1 + L, D) -> (B, K, t * u, h * p, w * p).

    ``patch`` = (u, p): the frames and pixels each token stands for.
    """

    def __init__(self, dim: int, out: int, hidden: int, patch: tuple[int, int]) -> None:
        super().__init__()
        self.out, (self.u, self.p) = out, patch
        self.conv = nn.Sequential(
            nn.Conv2d(dim, hidden, 3, padding=1),
            nn.GELU(),
            nn.Conv2d(hidden, hidden, 3, padding=1),
            nn.GELU(),
            nn.Conv2d(hidden, out * self.u * self.p * self.p, 1),
        )

    def forward(self, tokens: Tensor, grid: tuple[int, int, int]) -> Tensor:
        t, h, w = grid
        B, _, D = tokens.shape
        K, u, p = self.out, self.u, self.p
        x = tokens[:, 1:].reshape(B, t, h, w, D).permute(0, 1, 4, 2, 3).reshape(B * t, D, h, w)
        y = self.conv(x).reshape(B, t, K, u, p, p, h, w)
        return y.permute(0, 2, 1, 3, 6, 4, 7, 5).reshape(B, K, t * u, h * p, w * p)


class OnEncoder(nn.Module):
    """A pretrained encoder (all patch tokens, no masking) under a head.

    The encoder (``MAEEncoder``, ``NVAEEncoder``) has ``forward_features(x) -> (B, 1 + L, D)``
    (a summary token, then L tokens on a ``grid_size`` = (t, h, w) grid), ``embed_dim`` = D,
    ``blocks`` (shallow to deep) and a final ``norm``.

    ``freeze``: "frozen" trains the head only; "partial" also the last ``unfreeze_blocks``
    blocks and the final norm; "full" everything.
    """

    def __init__(
        self, encoder: nn.Module, head: nn.Module, freeze: Freeze, unfreeze_blocks: int
    ) -> None:
        super().__init__()
        self.encoder, self.head, self.freeze = encoder, head, freeze
        trainable = {
            "frozen": [],
            "partial": [*encoder.blocks[len(encoder.blocks) - unfreeze_blocks :], encoder.norm]
            if unfreeze_blocks
            else [],
            "full": [encoder],
        }[freeze]
        encoder.requires_grad_(False)
        for module in trainable:
            module.requires_grad_(True)

    def features(self, x: Tensor) -> Tensor:
        """x: (B, C, T, H, W) -> the head's output."""
        frozen = not any(p.requires_grad for p in self.encoder.parameters())
        with torch.set_grad_enabled(torch.is_grad_enabled() and not frozen):
            tokens = self.encoder.forward_features(x)
        return self.head(tokens, self.encoder.grid_size)

    def train(self, mode: bool = True) -> OnEncoder:
        super().train(mode)
        if self.freeze == "frozen":
            self.encoder.eval()  # a frozen encoder stays in inference mode
        return self


class EncoderRegressor(OnEncoder):
    """A pretrained encoder and a vector head (``pool`` or ``conv``): (B, C, T, H, W) ->
    (B, K), through a sigmoid with ``squash``."""

    def __init__(
        self,
        encoder: nn.Module,
        out: int,
        head: str = "pool",
        hidden: int = 256,
        freeze: Freeze = "frozen",
        unfreeze_blocks: int = 0,
        squash: bool = True,
    ) -> None:
        if head not in HEADS:
            raise ValueError(f"unknown head {head!r}; known: {', '.join(HEADS)}")
        super().__init__(
            encoder, HEADS[head](encoder.embed_dim, out, hidden), freeze, unfreeze_blocks
        )
        self.squash = squash

    def forward(self, x: Tensor) -> Tensor:
        """x: (B, C, T, H, W) -> (B, K), in (0, 1) with ``squash``."""
        y = self.features(x)
        return torch.sigmoid(y) if self.squash else y


class EncoderReconstructor(OnEncoder):
    """A pretrained encoder and a :class:`DenseHead`: (B, C, T, H, W) -> (B, K, T, H, W)."""

    def __init__(
        self,
        encoder: nn.Module,
        out: int,
        sample_shape: tuple[int, int, int, int],
        hidden: int = 256,
        freeze: Freeze = "frozen",
        unfreeze_blocks: int = 0,
    ) -> None:
        _, T, H, _ = sample_shape
        t, h, _ = encoder.grid_size
        head = DenseHead(encoder.embed_dim, out, hidden, (T // t, H // h))
        super().__init__(encoder, head, freeze, unfreeze_blocks)

    def forward(self, x: Tensor) -> Tensor:
        return self.features(x)


class BaselineCNN(nn.Module):
    """The from-scratch baseline after Dos Santos et al. (2021): two convolution blocks
    (3x3 conv, ReLU, max-pool) and a linear layer on the global average; sigmoid outputs
    with ``squash``. x: (B, C, T, H, W) -> (B, K); frames are stacked as channels.
    """

    def __init__(
        self, in_chans: int, num_frames: int, out: int, width: int = 64, squash: bool = True
    ) -> None:
        super().__init__()
        self.squash = squash
        c = in_chans * num_frames
        self.features = nn.Sequential(
            nn.Conv2d(c, width, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.fc = nn.Linear(2 * width, out)

    def forward(self, x: Tensor) -> Tensor:
        B, C, T, H, W = x.shape
        y = self.fc(self.features(x.reshape(B, C * T, H, W)).mean(dim=(2, 3)))
        return torch.sigmoid(y) if self.squash else y


class BaselineReconstructor(nn.Module):
    """A from-scratch image-to-image baseline: a small U-Net (two scales, skip connection)
    at the input's resolution. x: (B, C, T, H, W) -> (B, K, T, H, W); frames are stacked
    as channels. H and W must be even."""

    def __init__(self, in_chans: int, num_frames: int, out: int, width: int = 32) -> None:
        super().__init__()
        c, self.out, self.T = in_chans * num_frames, out, num_frames

        def block(i: int, o: int) -> nn.Sequential:
            return nn.Sequential(
                nn.Conv2d(i, o, 3, padding=1), nn.GELU(), nn.Conv2d(o, o, 3, padding=1), nn.GELU()
            )

        self.down = block(c, width)
        self.mid = block(width, 2 * width)
        self.up = nn.ConvTranspose2d(2 * width, width, 2, stride=2)
        self.fuse = block(2 * width, width)
        self.proj = nn.Conv2d(width, out * num_frames, 1)

    def forward(self, x: Tensor) -> Tensor:
        B, C, T, H, W = x.shape
        d = self.down(x.reshape(B, C * T, H, W))
        m = self.mid(nn.functional.max_pool2d(d, 2))
        y = self.proj(self.fuse(torch.cat([d, self.up(m)], dim=1)))
        return y.reshape(B, self.out, T, H, W)
