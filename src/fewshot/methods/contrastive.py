"""Two-view contrastive methods: SimCLR, triplet, N-pair and supervised contrastive.

They share one recipe and differ only in the objective: two augmented views of each
image → encoder → projection head → loss(z1, z2). The representation r before the
projection head is what evaluation uses (Chen et al. 2020, §4.2).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from pydantic import Field

from fewshot.data.types import Batch
from fewshot.config import MethodConfig, RunConfig
from fewshot.data.views import make_views
from fewshot.distributed import gather_others
from fewshot.methods.base import Method
from fewshot.models.heads import conv_projection_head, projection_head
from fewshot.objectives.contrastive import NPairLoss, NTXentLoss, SupConLoss, TripletLoss


class ProjectionConfig(MethodConfig):
    """The projection head g every view-based method puts between r and its loss (dropped after pre-training).
    Sizes are this project's small-scale defaults, not a paper's (SimCLR: 2048 → 128 on ResNet-50)."""

    projection_hidden: int = Field(256, ge=1, description="hidden width of the projection MLP")
    projection_dim: int = Field(128, ge=1, description="output width of the projection MLP")
    projection_layers: int = Field(2, ge=0, description="layers of the projection MLP; 0 = no projector")
    projection_conv_blocks: int = Field(0, ge=0, description="conv blocks (conv4 only) before the projection MLP")


class SimCLRConfig(ProjectionConfig):
    temperature: float = Field(0.5, gt=0, description="τ of NT-Xent (Chen et al. 2020: 0.5 for CIFAR-10, 0.1 for ImageNet's large batches)")
    positive_in_denominator: bool = Field(True, description="keep the positive in the denominator (SimCLR) or not (DCL)")
    gather_negatives: bool = Field(True, description="under DDP: negatives from every process's views (global batch), else local")


class TripletConfig(ProjectionConfig):
    margin: float = Field(0.2, ge=0, description="margin ε on the unit sphere (FaceNet, Schroff et al. 2015: 0.2)")
    batch_hard: bool = Field(True, description="mine the hardest positive and negative in the batch (Hermans et al. 2017)")


class NPairConfig(ProjectionConfig):
    l2_reg: float = Field(0.0, ge=0, description="weight of the embedding-norm regulariser (Sohn 2016 regularises the L2 norm)")


class SupConConfig(ProjectionConfig):
    temperature: float = Field(0.1, gt=0, description="τ of the SupCon loss (Khosla et al. 2020: 0.1)")


def encoder_projector_views(config: RunConfig) -> tuple[nn.Module, nn.Module, nn.Module]:
    """The encoder, projection head and view recipe that ``config`` names, as every view-based
    method builds them (``method.projection_conv_blocks`` continue a conv encoder before the MLP)."""
    data, m = config.data, config.method
    encoder = Method.build_encoder(config)
    if m.projection_conv_blocks:
        projector = conv_projection_head(encoder, m.projection_conv_blocks, m.projection_hidden, m.projection_dim, m.projection_layers)
    else:
        projector = projection_head(encoder.dim, m.projection_hidden, m.projection_dim, m.projection_layers)
    return encoder, projector, make_views(config.views.name, data.image_size, data.channels, **config.views.options)


class TwoViewMethod(Method):
    """Views → encoder → projector → objective. Subclasses set ``objective`` and may override ``loss``."""

    config_class = ProjectionConfig
    views_per_sample = 2

    def __init__(self, config: RunConfig, objective: nn.Module) -> None:
        super().__init__()
        self.encoder, self.projector, self.views = encoder_projector_views(config)
        self.objective = objective
        self.channels_last = config.train.channels_last

    def loss(self, z1: torch.Tensor, z2: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        return self.objective(z1, z2)

    def both_views(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Two augmented views of every image, stacked (2B, C, H, W): view 1 of all, then view 2."""
        v1, v2 = self.views.two_views(images, generator)
        views = torch.cat([v1, v2])
        return views.contiguous(memory_format=torch.channels_last) if self.channels_last else views

    def forward(self, batch: Batch, generator: torch.Generator) -> tuple[torch.Tensor, dict[str, float]]:
        images = batch["images"]
        z1, z2 = self.projector(self.encoder(self.both_views(images, generator))).float().chunk(2)
        return self.loss(z1, z2, batch.get("labels")), {}


class SimCLR(TwoViewMethod):
    """SimCLR (Chen et al. 2020): NT-Xent over the 2N views of a batch.

    Under DDP with ``method.gather_negatives`` the other processes' views join every anchor's
    denominator (the global batch, as the paper's TPU pods do); otherwise each process's loss
    sees only its own batch (the local loss).
    """

    config_class = SimCLRConfig

    def __init__(self, config: RunConfig) -> None:
        m = config.method
        super().__init__(config, NTXentLoss(m.temperature, m.positive_in_denominator))
        self.gather_negatives = m.gather_negatives

    def loss(self, z1: torch.Tensor, z2: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        negatives = gather_others(z1, z2) if self.gather_negatives else None
        return self.objective(z1, z2, negatives)


class Triplet(TwoViewMethod):
    """Triplet loss on views: the other view of the same image is the positive; the negative is
    the hardest other image in the batch (batch_hard) or the next image's view."""

    config_class = TripletConfig

    def __init__(self, config: RunConfig) -> None:
        super().__init__(config, TripletLoss(config.method.margin, config.method.batch_hard))
        self.batch_hard = config.method.batch_hard

    def loss(self, z1: torch.Tensor, z2: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        # On the unit sphere, as in FaceNet (Schroff et al. 2015), so the margin has a fixed scale.
        z1, z2 = nn.functional.normalize(z1, dim=1), nn.functional.normalize(z2, dim=1)
        if self.batch_hard:
            return self.objective(z1, z2)
        return self.objective(z1, z2, z2.roll(1, dims=0))


class NPair(TwoViewMethod):
    """N-pair loss (Sohn 2016): each view's positive against the N−1 other images' positives."""

    config_class = NPairConfig

    def __init__(self, config: RunConfig) -> None:
        super().__init__(config, NPairLoss(config.method.l2_reg))


class SupCon(TwoViewMethod):
    """Supervised contrastive (Khosla et al. 2020): every view of the same class is a positive."""

    config_class = SupConConfig

    inputs = ("images", "labels")

    def __init__(self, config: RunConfig) -> None:
        super().__init__(config, SupConLoss(config.method.temperature))

    def loss(self, z1: torch.Tensor, z2: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.objective(torch.stack([z1, z2], dim=1), labels)


CONTRASTIVE_METHODS: dict[str, Callable[[RunConfig], TwoViewMethod]] = {
    "simclr": SimCLR,
    "triplet": Triplet,
    "npair": NPair,
    "supcon": SupCon,
}
