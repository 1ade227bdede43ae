"""MAE: masked autoencoders for images (He et al. 2022, "Masked Autoencoders Are Scalable
Vision Learners").

Each image is cut into p × p patches and a random ``mask_ratio`` of them (75%) is removed. The
ViT encoder sees only the visible patches (with their positions) and [CLS]; a light transformer
decoder gets the encoded visible tokens, a learned mask token at every removed position, and
fixed positions, and predicts every patch's pixels. The loss is the per-patch MSE on the removed
patches only (optionally against each patch's standardised pixels, ``norm_pix_loss``).

``.encoder`` is the ViT itself: evaluation runs its normal forward over all patches ([CLS] or
mean-pooled, ``encoder.options.pool``). Departures from the paper, for small images and short
runs: the encoder keeps the ViT's learned positions (the paper fixes sine-cosine ones; the
decoder here uses fixed ones as the paper does); the decoder defaults to 2 blocks of width 128
(paper: 8 × 512 for ViT-L).
"""

from __future__ import annotations

import torch

from pydantic import Field

from fewshot.data.types import Batch
from fewshot.config import MethodConfig, RunConfig
from fewshot.data.masking import Masked, mask_patches, patchify
from fewshot.data.views import make_views
from fewshot.errors import ConfigError
from fewshot.methods.base import Method
from fewshot.models.decoders import MAEDecoder
from fewshot.models.encoders import ViT
from fewshot.objectives.reconstruction import masked_patch_loss, norm_pix_target

__all__ = ["MAE"]


class MAEConfig(MethodConfig):
    mask_ratio: float = Field(0.75, ge=0, lt=1, description="fraction of patches removed before the encoder (He et al. 2022: 0.75)")
    norm_pix_loss: bool = Field(True, description="target each patch's pixels standardised by its own mean and variance (He et al. 2022, Table 1d)")
    decoder_dim: int = Field(128, ge=4, description="decoder width (divisible by 4 and by decoder_heads; paper: 512 at ViT-L scale)")
    decoder_depth: int = Field(2, ge=1, description="decoder blocks (paper: 8 at ViT-L scale)")
    decoder_heads: int = Field(4, ge=1, description="decoder attention heads")


class MAE(Method):
    """ViT encoder on the visible patches → MAE decoder → pixels; loss on the removed patches."""

    config_class = MAEConfig

    @classmethod
    def build_encoder(cls, config: RunConfig) -> ViT:
        encoder = super().build_encoder(config)
        if not isinstance(encoder, ViT):
            raise ConfigError(f"method 'mae' needs a ViT encoder (e.g. encoder=vit-tiny), got '{config.encoder.name}'")
        return encoder

    def __init__(self, config: RunConfig) -> None:
        super().__init__()
        data, m = config.data, config.method
        self.encoder = encoder = self.build_encoder(config)
        self.patch_size = encoder.patch_size
        self.num_patches = encoder.patch_embed.num_patches
        removed = round(m.mask_ratio * self.num_patches)
        if removed < 1:
            raise ConfigError(f"method.mask_ratio={m.mask_ratio} removes none of the {self.num_patches} patches: nothing to reconstruct")
        self.decoder = MAEDecoder(
            self.num_patches, encoder.dim, self.patch_size**2 * data.channels, m.decoder_dim, m.decoder_depth, m.decoder_heads
        )
        self.views = make_views(config.views.name, data.image_size, data.channels, **config.views.options)
        self.mask_ratio, self.norm_pix_loss = m.mask_ratio, m.norm_pix_loss

    def mask(self, x: torch.Tensor, generator: torch.Generator) -> Masked:
        """The shared masking recipe on x's patches (:func:`mask_patches`): targets (B, L, p·p·C), mask
        (B, L) True = removed, ids_keep / ids_restore of one :func:`mae_shuffle` draw."""
        return mask_patches(patchify(x, self.patch_size), self.mask_ratio, generator)

    def encode_visible(
        self, x: torch.Tensor, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(latent (B, 1 + L_keep, dim), mask (B, L) True = removed, ids_restore (B, L)) for one
        draw of :meth:`mask`: the encoder only ever sees the kept patches."""
        masked = self.mask(x, generator)
        return self.encoder.forward_visible(x, masked.ids_keep), masked.mask, masked.ids_restore

    def forward(self, batch: Batch, generator: torch.Generator) -> tuple[torch.Tensor, dict[str, float]]:
        x = self.views(batch["images"], generator)
        masked = self.mask(x, generator)
        # The encoder embeds every patch, then keeps ids_keep (with their positions): the same as embedding masked.inputs.
        latent = self.encoder.forward_visible(x, masked.ids_keep)
        pred = self.decoder(latent, masked.ids_restore)  # (B, L, p·p·C)
        target = norm_pix_target(masked.targets) if self.norm_pix_loss else masked.targets
        return masked_patch_loss(pred.float(), target.float(), masked.mask), {}
