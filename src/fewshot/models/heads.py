"""Heads used only by objectives; dropped after pre-training (the encoder is the product)."""

from __future__ import annotations

from torch import nn

from fewshot.errors import ConfigError


def projection_head(in_dim: int, hidden_dim: int, out_dim: int, layers: int = 2) -> nn.Module:
    """SimCLR's projection g(h): (Linear → BN → ReLU) × (layers − 1) → Linear; 0 layers is the identity.

    Chen et al. (2020) found the loss is best applied after such a non-linear head, while the
    representation before it transfers better; that is why it is a separate module.
    """
    if layers == 0:
        return nn.Identity()
    blocks: list[nn.Module] = []
    width = in_dim
    for _ in range(layers - 1):
        blocks += [nn.Linear(width, hidden_dim, bias=False), nn.BatchNorm1d(hidden_dim), nn.ReLU(inplace=True)]
        width = hidden_dim
    blocks.append(nn.Linear(width, out_dim))
    return nn.Sequential(*blocks)


def conv_projection_head(encoder: nn.Module, conv_blocks: int, hidden_dim: int, out_dim: int, layers: int = 2) -> nn.Module:
    """Conv blocks that continue the encoder's feature map (2×2 max-pool each), then the MLP head.

    A deeper head leaves the layers it replaces free of the objective's invariances; SimCLR's
    authors found the layer before the head transfers better, and SimCLRv2 that a deeper head
    helps (Chen et al. 2020b). With Conv-4 this keeps r at the 3×3 grid of block 3 while the
    loss still sees a fourth block, as the full Conv-4 would.
    """
    from fewshot.models.encoders import conv_block

    grid = getattr(encoder, "grid", None)
    if grid is None:
        raise ConfigError("method.projection_conv_blocks needs an encoder with a spatial grid (conv4)")
    channels, h, w = grid
    blocks: list[nn.Module] = [nn.Unflatten(1, grid)]
    for _ in range(conv_blocks):
        blocks += conv_block(channels, channels, pool=min(h, w) >= 2)
        h, w = (h // 2, w // 2) if min(h, w) >= 2 else (h, w)
    blocks.append(nn.Flatten())
    return nn.Sequential(*blocks, projection_head(channels * h * w, hidden_dim, out_dim, layers))
