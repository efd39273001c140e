"""Vision-transformer building blocks: attention, MLP, block, patch embeddings, sin-cos positions.

Tokens are (B, N, D): batch, sequence, embedding. Images are channel-first, (B, C, H, W), and
image sequences (B, C, T, H, W). Patch tokens are ordered time-major, then row, then column,
the order of ``Conv3d(...).flatten(2)``; the position embeddings follow the same order.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def to_2tuple(x: int | tuple[int, int]) -> tuple[int, int]:
    """An int n -> (n, n); a pair is returned as a tuple."""
    if isinstance(x, int):
        return (x, x)
    h, w = x
    return (int(h), int(w))


class Attention(nn.Module):
    """Multi-head self-attention on ``F.scaled_dot_product_attention``."""

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = True) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim={dim} is not divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        """x: (B, N, D) -> (B, N, D)."""
        B, N, D = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, D // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, heads, N, D / heads)
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(B, N, D))


class Mlp(nn.Module):
    """Two-layer perceptron with a GELU."""

    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        """x: (B, N, D) -> (B, N, D)."""
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(
        self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: Tensor) -> Tensor:
        """x: (B, N, D) -> (B, N, D)."""
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class TubeletEmbed3D(nn.Module):
    """Non-overlapping tubelets to tokens: Conv3d with kernel = stride = (tubelet, patch, patch)."""

    def __init__(
        self,
        img_size: int | tuple[int, int] = 512,
        patch_size: int = 16,
        num_frames: int = 1,
        tubelet_size: int = 1,
        in_chans: int = 9,
        embed_dim: int = 128,
    ) -> None:
        super().__init__()
        self.img_size = to_2tuple(img_size)
        self.patch_size = patch_size
        self.num_frames = num_frames
        self.tubelet_size = tubelet_size
        if any(s % patch_size for s in self.img_size):
            raise ValueError(f"img_size={self.img_size} is not divisible by patch {patch_size}")
        if num_frames % tubelet_size:
            raise ValueError(f"num_frames={num_frames} is not divisible by tubelet {tubelet_size}")
        self.grid_size = (
            num_frames // tubelet_size,
            self.img_size[0] // patch_size,
            self.img_size[1] // patch_size,
        )
        self.num_patches = self.grid_size[0] * self.grid_size[1] * self.grid_size[2]
        kernel = (tubelet_size, patch_size, patch_size)
        self.proj = nn.Conv3d(in_chans, embed_dim, kernel_size=kernel, stride=kernel)

    def forward(self, x: Tensor) -> Tensor:
        """x: (B, C, T, H, W) -> (B, N, D), N = (T / tubelet) * (H / p) * (W / p)."""
        if x.ndim != 5:
            raise ValueError(f"expected (B, C, T, H, W), got shape {tuple(x.shape)}")
        if (x.shape[2], *x.shape[-2:]) != (self.num_frames, *self.img_size):
            raise ValueError(
                f"expected (T, H, W) = {(self.num_frames, *self.img_size)}, "
                f"got {tuple(x.shape[2:])}"
            )
        return self.proj(x).flatten(2).transpose(1, 2)


def sincos_pos_embed_1d(dim: int, pos: Tensor) -> Tensor:
    """pos: (M,) -> (M, dim) = [sin(pos * w), cos(pos * w)], w_k = 10000 ** (-2k / dim)."""
    if dim % 2:
        raise ValueError(f"dim={dim} must be even")
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2))
    angles = pos.to(torch.float64)[:, None] * omega[None, :]
    return torch.cat([angles.sin(), angles.cos()], dim=1).float()


def sincos_pos_embed_2d(dim: int, grid_h: int, grid_w: int) -> Tensor:
    """-> (grid_h * grid_w, dim), row-major; half the dimensions encode the row, half the column."""
    if dim % 4:
        raise ValueError(f"dim={dim} must be divisible by 4")
    rows, cols = torch.meshgrid(torch.arange(grid_h), torch.arange(grid_w), indexing="ij")
    return torch.cat(
        [
            sincos_pos_embed_1d(dim // 2, rows.flatten()),
            sincos_pos_embed_1d(dim // 2, cols.flatten()),
        ],
        dim=1,
    )


def sincos_pos_embed_3d(dim: int, grid_t: int, grid_h: int, grid_w: int) -> Tensor:
    """-> (grid_t * grid_h * grid_w, dim), time-major; split as Prithvi: 4/16 t, 6/16 h, 6/16 w."""
    if dim % 16:
        raise ValueError(f"dim={dim} must be divisible by 16")
    dim_t, dim_hw = dim // 16 * 4, dim // 16 * 6
    t, rows, cols = torch.meshgrid(
        torch.arange(grid_t), torch.arange(grid_h), torch.arange(grid_w), indexing="ij"
    )
    return torch.cat(
        [
            sincos_pos_embed_1d(dim_t, t.flatten()),
            sincos_pos_embed_1d(dim_hw, rows.flatten()),
            sincos_pos_embed_1d(dim_hw, cols.flatten()),
        ],
        dim=1,
    )
