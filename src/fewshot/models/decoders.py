"""Decoders for reconstruction pre-training: code r → image, and MAE's light patch decoder.

* :class:`ConvDecoder` -- the mirror of a Conv-4 encoder: upsample → 3×3 conv → BatchNorm → ReLU
  per encoder block, in reverse, ending in a 3×3 conv to the image channels.
* :class:`LinearDecoder` -- one linear map r → x̂: the deliberately weak decoder (capacity
  bottleneck). Its reconstructions lie in an affine subspace of dimension code_dim, so the
  encoder must put the most useful directions into r (with MSE it is PCA's subspace).
* :class:`MAEDecoder` -- He et al. 2022: visible latents + learned mask tokens, unshuffled to
  their positions, fixed 2-D sine-cosine positions, a few transformer blocks, pixels per patch.

Image decoders return logits (BCE) or pixel values (MSE) of shape (B, C, H, W); which loss
reads them is the method's choice.
"""

from __future__ import annotations

import torch
from torch import nn

from fewshot.errors import ConfigError
from fewshot.models.transformer import TokenTrunk

__all__ = ["ConvDecoder", "LinearDecoder", "MAEDecoder", "sincos_2d"]


class ConvDecoder(nn.Module):
    """Mirror of Conv-4 with ``blocks`` conv blocks of which the first ``pools`` max-pool.

    Linear(code_dim → width·s·s) starts at the encoder's final grid s × s; then, for encoder
    block j = blocks−1 … 0: nearest upsampling back to the block's input size if block j pooled,
    and a 3×3 conv (BatchNorm + ReLU, except the last, which outputs ``out_channels`` maps).
    """

    def __init__(self, code_dim: int, out_channels: int, image_size: int, width: int = 64, blocks: int = 4, pools: int = 4) -> None:
        super().__init__()
        if not 1 <= blocks or not 0 <= pools <= blocks:
            raise ConfigError(f"conv decoder needs blocks ≥ 1 and 0 ≤ pools ≤ blocks, got blocks={blocks}, pools={pools}")
        sizes = [image_size]  # sizes[j] = input size of encoder block j; sizes[blocks] = final grid
        for j in range(blocks):
            sizes.append(sizes[-1] // 2 if j < pools else sizes[-1])
        if sizes[-1] < 1:
            raise ConfigError(f"conv decoder with {pools} pools needs images of at least {2 ** pools} px, got {image_size}")
        self.grid = (width, sizes[-1], sizes[-1])
        self.project = nn.Linear(code_dim, width * sizes[-1] ** 2)
        layers: list[nn.Module] = [nn.ReLU(inplace=True)]
        for j in reversed(range(blocks)):
            if j < pools:
                layers.append(nn.Upsample(size=(sizes[j], sizes[j]), mode="nearest"))
            if j > 0:
                layers += [nn.Conv2d(width, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(inplace=True)]
            else:
                layers.append(nn.Conv2d(width, out_channels, 3, padding=1))
        self.layers = nn.Sequential(*layers)

    def forward(self, r: torch.Tensor) -> torch.Tensor:
        return self.layers(self.project(r).view(-1, *self.grid))  # (B, K) → (B, width, s, s) → (B, C, H, W)


class LinearDecoder(nn.Module):
    """x̂ = W r + b, reshaped to (B, C, H, W): one layer, the weak decoder."""

    def __init__(self, code_dim: int, out_channels: int, image_size: int) -> None:
        super().__init__()
        self.shape = (out_channels, image_size, image_size)
        self.linear = nn.Linear(code_dim, out_channels * image_size * image_size)

    def forward(self, r: torch.Tensor) -> torch.Tensor:
        return self.linear(r).view(-1, *self.shape)


def sincos_2d(dim: int, grid: int) -> torch.Tensor:
    """Fixed 2-D sine-cosine positions (grid·grid, dim), row-major like patchify, as MAE uses.

    Half the channels encode the row, half the column; each half is the 1-D transformer
    encoding [sin(pos·ω_i), cos(pos·ω_i)] with ω_i = 10000^(−i/(dim/4)), i < dim/4.
    """
    if dim % 4:
        raise ConfigError(f"sine-cosine positions need a width divisible by 4, got {dim}")
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))
    rows, cols = torch.meshgrid(torch.arange(grid, dtype=torch.float64), torch.arange(grid, dtype=torch.float64), indexing="ij")

    def encode(pos: torch.Tensor) -> torch.Tensor:
        angles = pos.reshape(-1, 1) * omega  # (grid², dim/4)
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    return torch.cat([encode(rows), encode(cols)], dim=1).float()


class MAEDecoder(nn.Module):
    """MAE's light decoder (He et al. 2022, §3 "MAE decoder").

    Input: the encoder's output for [CLS] + the visible patches (B, 1 + L_keep, encoder_dim)
    and ``ids_restore`` (B, L). The tokens are embedded to the decoder width, a learned mask
    token fills each removed position, ``ids_restore`` puts every token back at its patch
    position, fixed sine-cosine positions are added, and ``depth`` pre-norm blocks + LayerNorm +
    Linear predict the p·p·C pixels of every patch: output (B, L, patch_dim), [CLS] dropped.
    """

    def __init__(self, num_patches: int, encoder_dim: int, patch_dim: int, dim: int = 128, depth: int = 2, heads: int = 4) -> None:
        super().__init__()
        grid = int(round(num_patches**0.5))
        if grid * grid != num_patches:
            raise ConfigError(f"MAE decoder needs a square grid of patches, got {num_patches}")
        if dim % heads:
            raise ConfigError(f"MAE decoder width {dim} is not divisible by its {heads} heads")
        self.embed = nn.Linear(encoder_dim, dim)
        self.mask_token = nn.Parameter(torch.randn(1, 1, dim) * 0.02)  # MAE: normal(std=.02)
        # [CLS] gets the zero position, as in MAE's code; fixed, so a buffer, not a parameter.
        self.register_buffer("pos_embed", torch.cat([torch.zeros(1, dim), sincos_2d(dim, grid)]).unsqueeze(0), persistent=False)
        self.trunk = TokenTrunk(dim, depth, heads)
        self.pred = nn.Linear(dim, patch_dim)

    def forward(self, latent: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        x = self.embed(latent)  # (B, 1 + L_keep, dim)
        b, kept, d = x.shape
        length = ids_restore.shape[1]
        masks = self.mask_token.expand(b, length + 1 - kept, d)
        patches = torch.cat([x[:, 1:], masks], dim=1)  # (B, L, dim), in shuffled order
        patches = torch.gather(patches, 1, ids_restore.unsqueeze(-1).expand(-1, -1, d))  # back to patch order
        x = torch.cat([x[:, :1], patches], dim=1) + self.pos_embed
        return self.pred(self.trunk(x))[:, 1:]  # (B, L, patch_dim)
