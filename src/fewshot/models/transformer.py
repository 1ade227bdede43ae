"""Transformer parts shared by every token model (the ViT now; masked LM, GPT and text towers later)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


KeyValues = tuple[torch.Tensor, torch.Tensor]
"""Keys and values of earlier positions, each (B, heads, T_past, dim/heads)."""


class Attention(nn.Module):
    """Multi-head self-attention on PyTorch's fused scaled_dot_product_attention.

    ``past`` holds keys and values that come before this call's tokens: a KV cache during
    generation, or learned prefixes (prefix tuning). They are prepended to this call's keys
    and values; with ``causal`` the new tokens see every past position and the new ones up to
    their own. ``return_kv`` also returns the full (past + new) keys and values for the next call.
    """

    def __init__(self, dim: int, heads: int, causal: bool = False) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim {dim} is not divisible by heads {heads}")
        self.heads = heads
        self.causal = causal
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(
        self, x: torch.Tensor, past: KeyValues | None = None, return_kv: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, KeyValues]:
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)  # 3 × (B, h, T, d/h)
        mask, is_causal = None, self.causal
        if past is not None:
            k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)
            is_causal = False
            if self.causal and t > 1:  # new query i sees past positions and new keys ≤ i
                mask = torch.ones(t, k.shape[2], dtype=torch.bool, device=x.device).tril(diagonal=k.shape[2] - t)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal)
        out = self.proj(y.transpose(1, 2).reshape(b, t, d))
        return (out, (k, v)) if return_kv else out


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(LN(x)), then x + mlp(LN(x))."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0, causal: bool = False) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads, causal)
        self.norm2 = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(
        self, x: torch.Tensor, past: KeyValues | None = None, return_kv: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, KeyValues]:
        """``past`` / ``return_kv`` as in :class:`Attention` (KV cache, prefixes)."""
        if return_kv:
            a, kv = self.attn(self.norm1(x), past, return_kv=True)
        else:
            a, kv = self.attn(self.norm1(x), past), None
        x = x + a
        x = x + self.mlp(self.norm2(x))
        return (x, kv) if return_kv else x


class PatchEmbed(nn.Module):
    """Non-overlapping p×p patches → tokens, by one strided convolution."""

    def __init__(self, image_size: int, patch_size: int, in_channels: int, dim: int) -> None:
        super().__init__()
        if image_size % patch_size:
            raise ValueError(f"image_size {image_size} is not a multiple of patch_size {patch_size}")
        self.num_patches = (image_size // patch_size) ** 2
        self.proj = nn.Conv2d(in_channels, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # (B, C, H, W) → (B, patches, dim)
