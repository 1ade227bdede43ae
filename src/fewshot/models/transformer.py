"""The one token trunk: attention, the pre-norm block and :class:`TokenTrunk` (blocks + final norm).

Every token model embeds its own inputs (patches + [CLS] for the ViT, token ids for the text
tower) and adds positions, then runs the same trunk. The trunk takes past keys/values (a KV
cache or learned prefixes), a key padding mask, deep prompts and, in blocks built with
``context_dim``, cross-attention to a context sequence (image tokens for a text decoder).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


KeyValues = tuple[torch.Tensor, torch.Tensor]
"""Keys and values of earlier positions, each (B, heads, T_past, dim/heads)."""


def rotate(x: torch.Tensor, start: int, base: float = 10000.0) -> torch.Tensor:
    """Rotary positions (RoFormer, Su et al. 2021) of queries or keys ``x`` (B, heads, T, d) at positions
    p = start … start + T − 1, in the half-split layout: with x = [x₁, x₂] (each d/2 wide) and
    θ_i = base^(−2i/d), rotate(x)_p = [x₁ cos(pθ) − x₂ sin(pθ), x₂ cos(pθ) + x₁ sin(pθ)].
    Then rotate(q)_p · rotate(k)_s depends on p − s alone, which is what lets a head look a fixed number of
    tokens back wherever the tokens stand."""
    half = x.shape[-1] // 2
    theta = base ** (-torch.arange(half, device=x.device, dtype=torch.float32) * 2 / x.shape[-1])
    angle = torch.arange(start, start + x.shape[-2], device=x.device, dtype=torch.float32)[:, None] * theta  # (T, d/2)
    cos, sin = angle.cos().to(x.dtype), angle.sin().to(x.dtype)
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


class Attention(nn.Module):
    """Multi-head attention on PyTorch's fused scaled_dot_product_attention.

    Self-attention projects q, k, v with one fused ``qkv`` Linear (the name LoRA and (IA)³ target).
    With ``context_dim`` it is cross-attention: ``q`` projects x, ``kv`` projects the context
    (B, S, context_dim), so keys and values come from another sequence of another width.

    ``past`` holds keys and values before this call's tokens: a KV cache during generation, or
    learned prefixes (prefix tuning); they are prepended to the keys and values. With ``causal``
    the new tokens see every past position and the new ones up to their own. ``padding_mask``
    (B, T_keys) bool is True at keys to ignore (padding), over past + new keys (or the context).
    ``attn_mask`` (T, T_keys) or (B, T, T_keys) bool is True where query i may attend key j: any pattern
    (BLIP-2's Q-Former masks, Flamingo's media mask), combined with the causal and padding masks.
    ``return_kv`` also returns the full (past + new) keys and values for the next call.
    ``rotary`` (self-attention only): queries and keys carry their positions by :func:`rotate`, the new tokens
    numbered after the past ones; the cache holds rotated keys.
    """

    def __init__(self, dim: int, heads: int, causal: bool = False, context_dim: int | None = None, rotary: bool = False) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim {dim} is not divisible by heads {heads}")
        if rotary and (context_dim is not None or (dim // heads) % 2):
            raise ValueError(f"rotary positions need self-attention with an even head width, got {dim // heads}")
        self.heads, self.context_dim, self.rotary = heads, context_dim, rotary
        self.causal = causal and context_dim is None  # a context has no order relative to x
        if context_dim is None:
            self.qkv = nn.Linear(dim, 3 * dim)
        else:
            self.q = nn.Linear(dim, dim)
            self.kv = nn.Linear(context_dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)

    def split(self, y: torch.Tensor, parts: int) -> torch.Tensor:
        """(B, T, parts·D) → (parts, B, heads, T, D/heads)."""
        b, t, _ = y.shape
        return y.view(b, t, parts, self.heads, -1).permute(2, 0, 3, 1, 4)

    def forward(
        self,
        x: torch.Tensor,
        past: KeyValues | None = None,
        return_kv: bool = False,
        padding_mask: torch.Tensor | None = None,
        context: torch.Tensor | None = None,
        attn_mask: torch.Tensor | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, KeyValues]:
        b, t, d = x.shape
        if self.context_dim is None:
            q, k, v = self.split(self.qkv(x), 3)  # 3 × (B, h, T, d/h)
        else:
            if context is None:
                raise ValueError("cross-attention needs a context (B, S, context_dim)")
            q, (k, v) = self.split(self.q(x), 1)[0], self.split(self.kv(context), 2)
        if self.rotary:
            start = 0 if past is None else past[0].shape[2]
            q, k = rotate(q, start), rotate(k, start)
        if past is not None:
            k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)
        mask, is_causal = None, self.causal and past is None and padding_mask is None and attn_mask is None
        if self.causal and not is_causal and t > 1:
            # new query i sees the past and new keys ≤ i (SDPA's is_causal knows no past or padding)
            mask = torch.ones(t, k.shape[2], dtype=torch.bool, device=x.device).tril(diagonal=k.shape[2] - t)
        if attn_mask is not None:
            if attn_mask.shape[-2:] != (t, k.shape[2]) or attn_mask.ndim not in (2, 3) or attn_mask.dtype != torch.bool:
                raise ValueError(f"attn_mask must be bool (queries, keys) = {(t, k.shape[2])} or (batch, queries, keys), "
                                 f"got {attn_mask.dtype} {tuple(attn_mask.shape)}")
            given = attn_mask if attn_mask.ndim == 2 else attn_mask[:, None]  # (B, 1, T, T_k): every head alike
            mask = given if mask is None else given & mask
        if padding_mask is not None:
            if padding_mask.shape != (b, k.shape[2]):
                raise ValueError(f"padding_mask must be (batch, keys) = {(b, k.shape[2])}, got {tuple(padding_mask.shape)}")
            keep = ~padding_mask[:, None, None, :]  # (B, 1, 1, T_k), True = attend
            mask = keep if mask is None else keep & mask
        if attn_mask is not None or padding_mask is not None:
            # A query with no key to attend (a padded query under a causal mask, a row the given mask
            # empties) would give NaN; let it see every key instead: the caller ignores or zeroes its output.
            mask = mask | ~mask.any(dim=-1, keepdim=True)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal)
        out = self.proj(y.transpose(1, 2).reshape(b, t, d))
        return (out, (k, v)) if return_kv else out


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(LN(x)), [x + cross(LN(x), context)], then x + mlp(LN(x)).

    The cross-attention sub-layer exists only when built with ``context_dim`` (its width)."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0, causal: bool = False, context_dim: int | None = None,
                 rotary: bool = False) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads, causal, rotary=rotary)
        if context_dim is not None:
            self.norm_cross = nn.LayerNorm(dim)
            self.cross = Attention(dim, heads, context_dim=context_dim)
        self.norm2 = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(
        self,
        x: torch.Tensor,
        past: KeyValues | None = None,
        return_kv: bool = False,
        padding_mask: torch.Tensor | None = None,
        context: torch.Tensor | None = None,
        context_mask: torch.Tensor | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, KeyValues]:
        """``past`` / ``return_kv`` / ``padding_mask`` as in :class:`Attention` (KV cache, prefixes);
        ``context_mask`` (B, S) is the padding mask of the context."""
        a = self.attn(self.norm1(x), past, return_kv=return_kv, padding_mask=padding_mask)
        a, kv = a if return_kv else (a, None)
        x = x + a
        if hasattr(self, "cross"):
            x = x + self.cross(self.norm_cross(x), padding_mask=context_mask, context=context)
        x = x + self.mlp(self.norm2(x))
        return (x, kv) if return_kv else x


class TokenTrunk(nn.Module):
    """``depth`` pre-norm :class:`Block` s and a final LayerNorm: (B, T, D) embedded tokens → (B, T, D).

    past: per-block keys/values of earlier positions (KV cache or prefixes), as :class:`Attention`.
    padding_mask: (B, T_past + T) bool, True at padded keys. context / context_mask: the sequence
    that blocks built with ``context_dim`` cross-attend to, and its padding. prompts: (depth, B, n, D)
    deep prompts (VPT-deep, P-tuning v2): block l reads its own n tokens first, in place of block
    l−1's outputs there; they are dropped from the output. ``return_kv`` also returns the per-block
    (past + new) keys and values.
    """

    def __init__(
        self, dim: int, depth: int, heads: int, mlp_ratio: float = 4.0, causal: bool = False, context_dim: int | None = None,
        rotary: bool = False,
    ) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(Block(dim, heads, mlp_ratio, causal, context_dim, rotary) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)

    def forward(
        self,
        x: torch.Tensor,
        past: list[KeyValues] | None = None,
        padding_mask: torch.Tensor | None = None,
        context: torch.Tensor | None = None,
        context_mask: torch.Tensor | None = None,
        prompts: torch.Tensor | None = None,
        return_kv: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, list[KeyValues]]:
        n = 0 if prompts is None else prompts.shape[2]
        present = []
        for i, block in enumerate(self.blocks):
            if n:
                x = torch.cat([prompts[i], x[:, n:] if i else x], dim=1)
            x = block(x, None if past is None else past[i], return_kv, padding_mask, context, context_mask)
            if return_kv:
                x, kv = x
                present.append(kv)
        x = self.norm(x[:, n:])
        return (x, present) if return_kv else x


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
