"""Choosing which of the encoder's own parameters train: probes and (partial) fine-tuning.

- linear probe: nothing in the encoder trains, only the head on top of r (the encoder is a fixed
  feature extractor; the runner embeds the support set once).
- full fine-tuning: every parameter trains.
- partial fine-tuning: the last ``k`` blocks (and what follows them) train, the rest is frozen.
- BitFit (Ben Zaken et al. 2022, "BitFit: Simple Parameter-efficient Fine-tuning"): only the bias
  terms train.
- norm tuning: only the affine parameters of the normalisation layers (LayerNorm γ, β; BatchNorm
  γ, β) train. BatchNorm keeps its running statistics: the runner adapts in eval mode.

None of these adds a module, so there is nothing to merge: the trained values are the weights.
"""

from __future__ import annotations

import torch
from torch import nn

from fewshot.adapt.inject import freeze
from fewshot.errors import ConfigError, EncoderMismatch

__all__ = ["apply_bitfit", "apply_full", "apply_linear_probe", "apply_norm_tuning", "apply_partial", "encoder_blocks"]

NORMS = (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._BatchNorm)


def apply_linear_probe(encoder: nn.Module, *, generator: torch.Generator | None = None) -> nn.Module:
    return freeze(encoder)


def apply_full(encoder: nn.Module, *, generator: torch.Generator | None = None) -> nn.Module:
    return encoder.requires_grad_(True)


def encoder_blocks(encoder: nn.Module) -> list[list[str]]:
    """The encoder's blocks in forward order, each a list of parameter-name prefixes.

    ViT: [patch embedding + tokens], then each Block (the last with the final norm).
    Conv-4: each conv → BN → ReLU (→ pool) unit of ``features``.
    ResNet-18: the stem (conv1, bn1), then each BasicBlock of layer1..layer4 (8 in all).
    """
    from fewshot.models.encoders import Conv4, SmallResNet18, ViT

    if isinstance(encoder, ViT):
        units = [["patch_embed", "cls_token", "pos_embed"]] + [[f"trunk.blocks.{i}"] for i in range(len(encoder.trunk.blocks))]
        units[-1].append("trunk.norm")
        return units
    if isinstance(encoder, Conv4):
        units: list[list[str]] = []
        for i, layer in enumerate(encoder.features):
            if isinstance(layer, nn.Conv2d):
                units.append([])
            units[-1].append(f"features.{i}")
        return units
    if isinstance(encoder, SmallResNet18):
        units = [["net.conv1", "net.bn1"]]
        for layer in ("layer1", "layer2", "layer3", "layer4"):
            units += [[f"net.{layer}.{i}"] for i in range(len(getattr(encoder.net, layer)))]
        return units
    raise EncoderMismatch(f"partial: does not know the blocks of {type(encoder).__name__}; known: ViT, Conv4, SmallResNet18")


def apply_partial(encoder: nn.Module, k: int = 1, *, generator: torch.Generator | None = None) -> nn.Module:
    """Freeze ``encoder`` except its last ``k`` blocks (see :func:`encoder_blocks`)."""
    units = encoder_blocks(encoder)
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= len(units):
        raise ConfigError(f"partial: k must be an integer in 1..{len(units)} (the encoder's blocks), got {k!r}")
    prefixes = tuple(p for unit in units[-k:] for p in unit)
    freeze(encoder)
    for name, p in encoder.named_parameters():
        if any(name == pre or name.startswith(pre + ".") for pre in prefixes):
            p.requires_grad_(True)
    return encoder


def apply_bitfit(encoder: nn.Module, *, generator: torch.Generator | None = None) -> nn.Module:
    freeze(encoder)
    found = False
    for name, p in encoder.named_parameters():
        if name == "bias" or name.endswith(".bias"):
            p.requires_grad_(True)
            found = True
    if not found:
        raise EncoderMismatch(f"bitfit: {type(encoder).__name__} has no bias parameters")
    return encoder


def apply_norm_tuning(encoder: nn.Module, *, generator: torch.Generator | None = None) -> nn.Module:
    freeze(encoder)
    norms = [m for m in encoder.modules() if isinstance(m, NORMS) and any(True for _ in m.parameters(recurse=False))]
    if not norms:
        raise EncoderMismatch(f"norm: {type(encoder).__name__} has no normalisation layers with affine parameters")
    for m in norms:
        m.requires_grad_(True)
    return encoder
