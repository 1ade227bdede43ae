"""Prompt Generation Network (Loedeman et al. 2023, "Prompt Generation Networks for Input-based
Adaptation of Frozen Vision Transformers"): prompts that depend on the image.

A small network g maps each image x to logits over a learned token library T ∈ R^{L×D}, one row of
L logits per prompt; the prompts are convex mixtures of library tokens,

    w = softmax(g(x).view(n, L), dim=-1) ∈ R^{n×L},   P(x) = w T ∈ R^{n×D},

and enter the frozen ViT once like prompt tuning: ``z_0 = [P(x), x_cls, E + pos]``, r = LN(z_L)[CLS].
T (init N(0, 0.02²) as in the authors' code) and g are the trainable parts. g is either

- ``"conv"``: two Conv-4 blocks (3×3 conv → BN → ReLU → max-pool) of ``width`` channels (default
  32), global average pool, Linear(width, n·L); the paper uses a ResNet at reduced resolution,
  this is its small cousin; or
- ``"patch"`` (default): the base ViT's frozen patch embedding, mean over patches, then
  Linear(D, hidden) → GELU → Linear(hidden, n·L), hidden defaulting to D.

The paper's "prompt inversion" (turning P(x) into
pixels for API-only models) is not part of this module.
"""

from __future__ import annotations

import torch
from torch import nn

from fewshot.adapt.prompts import PromptWrapper, check_int, prompted, require_vit
from fewshot.errors import ConfigError
from fewshot.models.encoders import conv_block

NETS = ("conv", "patch")


class PromptGenerationNetwork(PromptWrapper):
    """PGN: per-image prompts P(x) = softmax(g(x)) T from a library of L tokens (see module doc).

    Trainable: L·D plus g's parameters (``"patch"``: D·h + h + h·nL + nL; ``"conv"``:
    9·C·w + w + 2w + 9·w² + w + 2w + w·nL + nL).
    """

    def __init__(
        self,
        encoder: nn.Module,
        *,
        n_prompts: int = 8,
        library_size: int = 64,
        net: str = "patch",
        width: int | None = None,
        hidden: int | None = None,
    ) -> None:
        super().__init__(encoder)
        who = "prompt generation network"
        require_vit(encoder, who)
        self.n_prompts = check_int(who, "n_prompts", n_prompts, 1)
        self.library_size = check_int(who, "library_size", library_size, 1)
        if net not in NETS:
            raise ConfigError(f"{who}: unknown net {net!r}; choose one of {', '.join(NETS)}")
        out = self.n_prompts * self.library_size
        if net == "conv":
            if hidden is not None:
                raise ConfigError(f"{who}: hidden sizes the 'patch' net's MLP; with net='conv' set width instead")
            w = check_int(who, "width", 32 if width is None else width, 1)
            channels = encoder.patch_embed.proj.in_channels
            self.generator_net = nn.Sequential(
                *conv_block(channels, w, pool=True), *conv_block(w, w, pool=True),
                nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(w, out),
            )  # fmt: skip
        else:
            if width is not None:
                raise ConfigError(f"{who}: width sizes the 'conv' net; with net='patch' set hidden instead")
            h = check_int(who, "hidden", self.dim if hidden is None else hidden, 1)
            self.generator_net = nn.Sequential(nn.Linear(self.dim, h), nn.GELU(), nn.Linear(h, out))
        self.net = net
        self.library = nn.Parameter(torch.randn(self.library_size, self.dim) * 0.02)

    def prompt_weights(self, images: torch.Tensor) -> torch.Tensor:
        """w = softmax over the library of g(x): (B, n_prompts, library_size), rows sum to 1."""
        if self.net == "patch":
            features = self.base.patch_embed(images).mean(dim=1)  # frozen, (B, D)
        else:
            features = images
        logits = self.generator_net(features).view(images.shape[0], self.n_prompts, self.library_size)
        return logits.softmax(dim=-1)

    def prompts(self, images: torch.Tensor) -> torch.Tensor:
        """P(x) = w T: (B, n_prompts, D)."""
        return self.prompt_weights(images) @ self.library

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return prompted(self.base, images, self.prompts(images))
