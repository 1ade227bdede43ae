"""Heads used only by objectives; dropped after pre-training (the encoder is the product)."""

from __future__ import annotations

from torch import nn


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
