"""Science heads on a pretrained encoder, and the from-scratch CNN baseline.

Every model here maps images ``(B, C, T, H, W)`` to ``(B, K)`` values in (0, 1) (sigmoid
outputs: dimming factors for autocalibration).
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


HEADS = {"pool": PoolHead, "conv": ConvHead}


class EncoderRegressor(nn.Module):
    """A pretrained encoder (all patch tokens, no masking) and a head; sigmoid outputs.

    The encoder (``MAEEncoder``, ``NVAEEncoder``) has ``forward_features(x) -> (B, 1 + L, D)``
    (a summary token, then L tokens on a ``grid_size`` = (t, h, w) grid), ``embed_dim`` = D,
    ``blocks`` (shallow to deep) and a final ``norm``.

    ``freeze``: "frozen" trains the head only; "partial" also the last ``unfreeze_blocks``
    blocks and the final norm; "full" everything.
    """

    def __init__(
        self,
        encoder: nn.Module,
        out: int,
        head: str = "pool",
        hidden: int = 256,
        freeze: Freeze = "frozen",
        unfreeze_blocks: int = 0,
    ) -> None:
        super().__init__()
        if head not in HEADS:
            raise ValueError(f"unknown head {head!r}; known: {', '.join(HEADS)}")
        self.encoder = encoder
        self.head = HEADS[head](encoder.embed_dim, out, hidden)
        self.freeze = freeze
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

    def forward(self, x: Tensor) -> Tensor:
        """x: (B, C, T, H, W) -> (B, K) in (0, 1)."""
        frozen = not any(p.requires_grad for p in self.encoder.parameters())
        with torch.set_grad_enabled(torch.is_grad_enabled() and not frozen):
            tokens = self.encoder.forward_features(x)
        return torch.sigmoid(self.head(tokens, self.encoder.grid_size))

    def train(self, mode: bool = True) -> EncoderRegressor:
        super().train(mode)
        if self.freeze == "frozen":
            self.encoder.eval()  # a frozen encoder stays in inference mode
        return self


class BaselineCNN(nn.Module):
    """The from-scratch baseline after Dos Santos et al. (2021): two convolution blocks
    (3x3 conv, ReLU, max-pool) and a linear layer on the global average; sigmoid outputs.
    x: (B, C, T, H, W) -> (B, K); frames are stacked as channels.
    """

    def __init__(self, in_chans: int, num_frames: int, out: int, width: int = 64) -> None:
        super().__init__()
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
        f = self.features(x.reshape(B, C * T, H, W)).mean(dim=(2, 3))
        return torch.sigmoid(self.fc(f))
