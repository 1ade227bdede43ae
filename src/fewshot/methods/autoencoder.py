"""Autoencoders with the four bottlenecks that stop them from learning the identity.

An autoencoder maps x to a code r = f(x) and back to x̂ = g(r), trained to reconstruct x. With
enough room it copies x and learns nothing; a bottleneck forces r to keep only what matters.
Each bottleneck is one config switch and they combine freely:

* dimension -- r = Linear(conv features) has only ``method.code_dim`` entries;
* information -- Gaussian noise σ·ε on r while training (``method.code_noise``), or a denoising
  autoencoder (Vincent et al. 2008): x is corrupted by Gaussian noise (``method.input_noise``)
  and/or by zeroing a random fraction of its pixels or patches (``method.input_mask_ratio``,
  ``method.input_mask_patch``), and the loss targets the clean x;
* sparsity -- keep only the k largest entries of r (Makhzani & Frey 2014; ``method.topk``)
  or add λ·Σ_j |r_j| to the loss (``method.l1``);
* capacity -- a one-layer linear decoder (``method.decoder: linear``) instead of the conv
  mirror of the encoder, so r must carry directions a linear map can turn into pixels.

``.encoder`` is :class:`CodeEncoder` (conv encoder + code layer, top-k included), so evaluation
embeds images with the code r; the decoder is dropped after pre-training.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import nn

from fewshot.data.types import Batch
from fewshot.config import MethodConfig, RunConfig
from fewshot.data.masking import random_mask
from fewshot.data.views import make_views
from fewshot.errors import ConfigError
from fewshot.methods.base import Method
from fewshot.models.decoders import ConvDecoder, LinearDecoder
from fewshot.objectives.reconstruction import bce_reconstruction, l1_sparsity, mse_reconstruction, topk_sparsify

__all__ = ["Autoencoder", "CodeEncoder"]


class CodeEncoder(nn.Module):
    """r = Linear(backbone(x)) of size ``code_dim``, k-sparse when ``topk`` > 0 (training and
    evaluation alike, so the features evaluated are the codes the decoder was trained on)."""

    def __init__(self, backbone: nn.Module, code_dim: int, topk: int = 0) -> None:
        super().__init__()
        if topk > code_dim:
            raise ConfigError(f"method.topk={topk} keeps more entries than the code has (method.code_dim={code_dim})")
        self.backbone = backbone
        self.code = nn.Linear(backbone.dim, code_dim)
        self.topk = topk
        self.dim = code_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        r = self.code(self.backbone(x))
        return topk_sparsify(r, self.topk) if self.topk else r


def _conv_shape(backbone: nn.Module, image_size: int) -> tuple[int, int, int]:
    """(width, blocks, pools) of a Conv-4 backbone, so the decoder mirrors it; other backbones get
    Conv-4's defaults with as many pools (≤ 4) as the image size allows."""
    features = getattr(backbone, "features", None)
    if hasattr(backbone, "grid") and isinstance(features, nn.Sequential):
        blocks = sum(isinstance(m, nn.Conv2d) for m in features)
        pools = sum(isinstance(m, nn.MaxPool2d) for m in features)
        return backbone.grid[0], blocks, pools
    pools = min(4, image_size.bit_length() - 1)
    return 64, max(pools, 1), pools


class AutoencoderConfig(MethodConfig):
    # One field per bottleneck: dimension, information (noise), sparsity, capacity (a linear decoder).
    code_dim: int = Field(64, ge=1, description="size of the code r = Linear(encoder features), the dimension bottleneck")
    code_noise: float = Field(0.0, ge=0, description="σ of Gaussian noise added to r while training (information bottleneck)")
    input_noise: float = Field(0.0, ge=0, description="denoising: σ of Gaussian noise added to x; the loss targets the clean x")
    input_mask_ratio: float = Field(
        0.0, ge=0, lt=1, description="denoising: fraction of input patches set to 0 (Vincent et al. 2008's masking noise)"
    )
    input_mask_patch: int = Field(1, ge=1, description="denoising: side of the square patches input_mask_ratio drops (1 = pixels)")
    topk: int = Field(0, ge=0, description="k-sparse: keep the k largest entries of r, zero the rest; 0 = off")
    l1: float = Field(0.0, ge=0, description="sparse: weight λ of the L1 penalty λ·mean_b Σ_j |r_bj|")
    decoder: Literal["conv", "linear"] = Field(
        "conv", description="conv (mirror of the conv encoder) or linear (one layer: the capacity bottleneck)"
    )
    reconstruction: Literal["bce", "mse"] = Field("bce", description="bce (pixels in [0, 1], decoder gives logits) or mse")


class Autoencoder(Method):
    """Conv autoencoder: x → (corrupt) → encoder → r → (code noise) → decoder → x̂, with

        L = rec(x̂, x) + λ·Ω(r),   rec = BCE (``reconstruction: bce``) or MSE, Ω = :func:`l1_sparsity`,

    x the clean view. Code noise is added only in training mode (it is a regulariser, like
    dropout); the input corruption is the denoising task itself, so it applies whenever the loss
    is computed. The input is one view of ``config.views`` (``none``: the image itself).
    """

    config_class = AutoencoderConfig

    @classmethod
    def build_encoder(cls, config: RunConfig) -> CodeEncoder:
        backbone = super().build_encoder(config)
        return CodeEncoder(backbone, config.method.code_dim, config.method.topk)

    def __init__(self, config: RunConfig) -> None:
        super().__init__()
        data, m = config.data, config.method
        self.encoder = self.build_encoder(config)
        backbone = self.encoder.backbone
        if m.decoder == "linear":
            self.decoder: nn.Module = LinearDecoder(m.code_dim, data.channels, data.image_size)
        else:
            width, blocks, pools = _conv_shape(backbone, data.image_size)
            self.decoder = ConvDecoder(m.code_dim, data.channels, data.image_size, width, blocks, pools)
        if m.input_mask_ratio and data.image_size % m.input_mask_patch:
            raise ConfigError(
                f"method.input_mask_patch={m.input_mask_patch} does not divide data.image_size={data.image_size}"
            )
        self.views = make_views(config.views.name, data.image_size, data.channels, **config.views.options)
        self.reconstruction = bce_reconstruction if m.reconstruction == "bce" else mse_reconstruction
        self.code_noise, self.l1 = m.code_noise, m.l1
        self.input_noise, self.input_mask_ratio, self.input_mask_patch = m.input_noise, m.input_mask_ratio, m.input_mask_patch
        self.channels_last = config.train.channels_last

    def corrupt(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """x̃ for the denoising autoencoder: x + σ·ε, then exactly round(ratio·L) of the L
        patches (p × p, p = input_mask_patch) set to 0 per image. x itself when both are off."""
        if self.input_noise:
            x = x + self.input_noise * torch.randn(x.shape, generator=generator).to(x.device, x.dtype)
        if self.input_mask_ratio:
            b, _, h, w = x.shape
            p = self.input_mask_patch
            hidden = random_mask((b, (h // p) * (w // p)), self.input_mask_ratio, generator).view(b, 1, h // p, w // p)
            hidden = hidden.repeat_interleave(p, dim=2).repeat_interleave(p, dim=3).to(x.device)
            x = x.masked_fill(hidden, 0.0)
        return x

    def perturb_code(self, r: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """r + σ·ε in training mode (the information bottleneck), r unchanged in eval mode."""
        if self.training and self.code_noise:
            return r + self.code_noise * torch.randn(r.shape, generator=generator).to(r.device, r.dtype)
        return r

    def forward(self, batch: Batch, generator: torch.Generator) -> tuple[torch.Tensor, dict[str, float]]:
        images = batch["images"]
        x = self.views(images, generator)
        x_in = self.corrupt(x, generator)
        if self.channels_last:
            x_in = x_in.contiguous(memory_format=torch.channels_last)
        r = self.encoder(x_in)
        x_hat = self.decoder(self.perturb_code(r, generator))
        rec = self.reconstruction(x_hat.float(), x.float())
        if not self.l1:
            return rec, {"reconstruction": rec.item()}
        sparsity = l1_sparsity(r.float())
        return rec + self.l1 * sparsity, {"reconstruction": rec.item(), "l1": sparsity.item()}
