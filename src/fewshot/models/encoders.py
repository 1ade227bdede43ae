"""Encoders behind one constructor by name.

Every encoder maps its input x (images (B, C, H, W); token ids (B, T) for the text tower) to a
flat representation r of shape (B, encoder.dim). Token models (ViT, text tower) also offer
``forward_tokens(x) -> (B, T, dim)``: [CLS] / start token first, after the trunk's final norm.
"""

from __future__ import annotations

from typing import Callable

import torch
import torchvision
from torch import nn

from fewshot.errors import ConfigError
from fewshot.models.language import TextTransformer
from fewshot.models.transformer import PatchEmbed, TokenTrunk

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}


def register(name: str) -> Callable:
    def add(builder: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        _REGISTRY[name] = builder
        return builder

    return add


def encoder_names() -> list[str]:
    return sorted(_REGISTRY)


def create_encoder(name: str, in_channels: int | None = None, image_size: int | None = None, **options) -> nn.Module:
    """Build encoder `name`; options left at None keep the builder's default (image encoders:
    1 channel, 28 px; the text tower takes vocab_size and max_len instead)."""
    if name not in _REGISTRY:
        raise ConfigError(f"unknown encoder '{name}'; known encoders: {', '.join(encoder_names())}")
    options = {k: v for k, v in dict(options, in_channels=in_channels, image_size=image_size).items() if v is not None}
    try:
        return _REGISTRY[name](**options)
    except TypeError as exc:  # an option the builder does not take
        raise ConfigError(f"encoder '{name}': {exc}") from None


def conv_block(in_channels: int, out_channels: int, pool: bool) -> list[nn.Module]:
    """3×3 conv → BatchNorm → ReLU (→ 2×2 max-pool): the unit of Conv-4."""
    layers = [nn.Conv2d(in_channels, out_channels, 3, padding=1), nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True)]
    return layers + [nn.MaxPool2d(2)] if pool else layers


class Conv4(nn.Module):
    """The standard few-shot backbone (Vinyals et al. 2016; Snell et al. 2017):
    4 × [3×3 conv (width) → BatchNorm → ReLU → 2×2 max-pool], flattened.

    ``pools`` < blocks drops the max-pool of the last blocks, keeping a spatial grid in r: at
    28 px the standard net ends at 1×1×64, with pools=3 at 3×3×64 = 576 features.
    ``grid`` = (channels, h, w) of the map before flattening, for heads that continue it.
    """

    def __init__(self, in_channels: int = 1, image_size: int = 28, width: int = 64, pools: int = 4, blocks: int = 4) -> None:
        super().__init__()
        if not 1 <= blocks or not 0 <= pools <= blocks:
            raise ConfigError(f"conv4 needs blocks ≥ 1 and 0 ≤ pools ≤ blocks, got blocks={blocks}, pools={pools}")
        layers: list[nn.Module] = []
        size = image_size
        for block in range(blocks):
            layers += conv_block(in_channels if block == 0 else width, width, pool=block < pools)
            size = size // 2 if block < pools else size
        if size < 1:
            raise ConfigError(f"conv4 with {pools} pools needs images of at least {2 ** pools} px, got {image_size}")
        self.features = nn.Sequential(*layers)
        self.grid = (width, size, size)
        self.dim = width * size * size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x).flatten(1)


@register("conv4")
def conv4(in_channels: int = 1, image_size: int = 28, width: int = 64, pools: int = 4, blocks: int = 4) -> nn.Module:
    return Conv4(in_channels, image_size, width, pools, blocks)


class SmallResNet18(nn.Module):
    """torchvision's ResNet-18 with the CIFAR stem (3×3 stride-1 conv, no max-pool) for small images."""

    def __init__(self, in_channels: int = 1, image_size: int = 32) -> None:
        super().__init__()
        net = torchvision.models.resnet18(weights=None)
        net.conv1 = nn.Conv2d(in_channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
        net.maxpool = nn.Identity()
        net.fc = nn.Identity()
        self.net = net
        self.dim = 512

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


@register("resnet18")
def resnet18(in_channels: int = 1, image_size: int = 32) -> nn.Module:
    return SmallResNet18(in_channels, image_size)


class ViT(nn.Module):
    """A Vision Transformer (Dosovitskiy et al. 2021): patch tokens + learned positions, a [CLS]
    token, pre-norm blocks; r is the final LayerNorm of the [CLS] token (``pool="cls"``) or the
    mean of the patch tokens' (``pool="mean"``, which MAE reports works as well: He et al. 2022, §A.1)."""

    def __init__(
        self,
        in_channels: int = 1,
        image_size: int = 28,
        patch_size: int = 4,
        dim: int = 192,
        depth: int = 6,
        heads: int = 3,
        pool: str = "cls",
    ) -> None:
        super().__init__()
        if pool not in ("cls", "mean"):
            raise ConfigError(f"ViT pool must be 'cls' or 'mean', got {pool!r}")
        self.pool = pool
        self.patch_size = patch_size
        self.patch_embed = PatchEmbed(image_size, patch_size, in_channels, dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.randn(1, self.patch_embed.num_patches + 1, dim) * 0.02)
        self.trunk = TokenTrunk(dim, depth, heads)
        self.dim = dim

    def input_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """[CLS] + patch tokens with positions added, the trunk's input: (B, 1 + patches, dim)."""
        tokens = self.patch_embed(x)
        return torch.cat([self.cls_token.expand(tokens.shape[0], -1, -1), tokens], dim=1) + self.pos_embed

    def forward_tokens(self, x: torch.Tensor) -> torch.Tensor:
        return self.trunk(self.input_tokens(x))  # (B, 1 + patches, dim)

    def pool_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """r from the trunk's output [CLS] + patches: (B, 1 + L, dim) → (B, dim)."""
        return tokens[:, 1:].mean(dim=1) if self.pool == "mean" else tokens[:, 0]

    def forward_visible(self, x: torch.Tensor, ids_keep: torch.Tensor) -> torch.Tensor:
        """MAE's encoder pass (He et al. 2022): only the patches at ``ids_keep`` (B, L_keep) enter
        the blocks, each with its own position, after [CLS]: (B, C, H, W) → (B, 1 + L_keep, dim).
        Removed patches never reach attention, so nothing of theirs can leak into the output."""
        tokens = self.patch_embed(x) + self.pos_embed[:, 1:]  # (B, L, dim)
        tokens = torch.gather(tokens, 1, ids_keep.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(tokens.shape[0], -1, -1)
        return self.trunk(torch.cat([cls, tokens], dim=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool_tokens(self.forward_tokens(x))


@register("vit-tiny")
def vit_tiny(in_channels: int = 1, image_size: int = 28, patch_size: int = 4, depth: int = 6, pool: str = "cls") -> nn.Module:
    return ViT(in_channels, image_size, patch_size, dim=192, depth=depth, heads=3, pool=pool)


@register("text-transformer")
def text_transformer(
    vocab_size: int, max_len: int, dim: int = 128, depth: int = 4, heads: int = 4, mlp_ratio: float = 4.0, causal: bool = False,
    positions: str = "learned",
) -> nn.Module:
    """The text tower (token ids → r); ``causal`` for a GPT's, else a masked LM's; ``positions`` learned or rotary. See models/language.py."""
    return TextTransformer(vocab_size, max_len, dim, depth, heads, mlp_ratio, causal, positions)
