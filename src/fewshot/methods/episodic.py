"""Contrastive learning as meta-learning: every batch is one few-shot episode without labels.

Each of the B images of a batch is a class of its own (ProtoCLR: Medina, Devos & Grossglauser
2020, "Self-supervised prototypical transfer learning for few-shot classification"). Its support
set is S augmented views (or, with ``method.support_is_original``, the image itself, as ProtoCLR
does) and its query set Q other augmented views. The encoder (+ projector) embeds all B·(S+Q)
views in one pass, and an episodic objective classifies the B·Q queries among the B classes from
the support set alone:

* ``protonet``: nearest prototype (Snell et al. 2017), the ProtoCLR loss;
* ``r2d2``: a ridge-regression classifier fitted to the support in closed form, with λ and the
  output scale learned (Bertinetto et al. 2019).

Unlike NT-Xent, a query is compared with the B prototypes only, not with every other view.
Under DDP each process's batch is its own episode.
"""

from __future__ import annotations

from typing import Callable, Literal

import torch
from pydantic import Field

from fewshot.data.types import Batch
from fewshot.config import RunConfig
from fewshot.data.views import IdentityViews
from fewshot.errors import ConfigError
from fewshot.methods.contrastive import ProjectionConfig, TwoViewMethod
from fewshot.objectives.episodic import R2D2Head, prototypical_loss

__all__ = ["EPISODIC_METHODS", "EpisodicMethod", "ProtoNet", "R2D2"]


class EpisodicConfig(ProjectionConfig):
    # Each image of a batch is a class; its support and query sets are views of it (ProtoCLR, Medina et al. 2020).
    support_views: int = Field(1, ge=1, description="support views S per image (ProtoCLR: 1)")
    query_views: int = Field(3, ge=1, description="query views Q per image (ProtoCLR: 3); S + Q views per image in all")
    support_is_original: bool = Field(True, description="the un-augmented image is the support (ProtoCLR); needs support_views=1")


class ProtoNetConfig(EpisodicConfig):
    proto_metric: Literal["euclidean", "cosine"] = Field(
        "euclidean", description="−‖q − c‖² (Snell et al. 2017, ProtoCLR) or cos(q, c)/temperature"
    )
    temperature: float = Field(0.5, gt=0, description="τ of the cosine logits (proto_metric=cosine only)")


class R2D2Config(EpisodicConfig):
    r2d2_lambda_init: float = Field(1.0, gt=0, description="initial ridge penalty λ (learned, log-parametrised; Bertinetto et al. 2019: 1)")
    r2d2_scale_init: float = Field(10.0, gt=0, description="initial output scale α of the logits α·X_qW (learned, log-parametrised)")


class EpisodicMethod(TwoViewMethod):
    """Views → encoder → projector → episodic objective on (support, query).

    Reuses :class:`TwoViewMethod`'s encoder, projector (``method.projection_layers=0`` for none,
    as ProtoCLR) and view recipe, but makes S + Q views per image instead of two. Subclasses
    implement ``episode_loss(support (B, S, D), query (B, Q, D)) -> (loss, accuracy)``.
    """

    config_class = EpisodicConfig

    def __init__(self, config: RunConfig, objective: torch.nn.Module | None = None) -> None:
        super().__init__(config, objective)
        m = config.method
        if m.support_is_original and m.support_views != 1:
            raise ConfigError(
                f"method.support_is_original makes the image itself its one support view; "
                f"set method.support_views=1 (got {m.support_views})"
            )
        self.support_views, self.query_views = m.support_views, m.query_views
        self.support_is_original = m.support_is_original
        self.views_per_sample = m.support_views + m.query_views
        self.original = IdentityViews(config.data.image_size)  # resizes only if the batch is not image_size

    def episode_views(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """The S + Q views of every image, view-major ((S+Q)·B, C, H, W): view 0 of all images, then view 1, …

        Augmented views are drawn in one pass over the batch repeated (as ``two_views``), so
        views of one image are independent draws.
        """
        augmented = self.views_per_sample - (1 if self.support_is_original else 0)
        views = self.views(images.repeat(augmented, 1, 1, 1), generator)
        if self.support_is_original:
            views = torch.cat([self.original(images, generator), views])
        return views.contiguous(memory_format=torch.channels_last) if self.channels_last else views

    def episode_loss(self, support: torch.Tensor, query: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def forward(self, batch: Batch, generator: torch.Generator) -> tuple[torch.Tensor, dict[str, float]]:
        images = batch["images"]
        b = images.shape[0]
        z = self.projector(self.encoder(self.episode_views(images, generator))).float()
        z = z.reshape(self.views_per_sample, b, -1).transpose(0, 1)  # (B, S+Q, D): row n is class n
        loss, accuracy = self.episode_loss(z[:, : self.support_views], z[:, self.support_views :])
        return loss, {"episode_acc": accuracy.item()}


class ProtoNet(EpisodicMethod):
    """ProtoCLR / prototypical networks on unlabeled episodes: queries against the mean of their
    image's support views, squared euclidean (Snell et al. 2017) or cosine / τ."""

    config_class = ProtoNetConfig

    def __init__(self, config: RunConfig) -> None:
        super().__init__(config)
        self.metric, self.temperature = config.method.proto_metric, config.method.temperature

    def episode_loss(self, support: torch.Tensor, query: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return prototypical_loss(support, query, self.metric, self.temperature)


class R2D2(EpisodicMethod):
    """R2-D2 (Bertinetto et al. 2019) on unlabeled episodes: one-hot ridge regression on the support
    views in closed form, W = Xᵀ(XXᵀ + λI)⁻¹Y, queries scored α·X_qW; λ and α learned
    (the paper's scalar β cancels in the softmax; see :class:`R2D2Head`)."""

    config_class = R2D2Config

    def __init__(self, config: RunConfig) -> None:
        m = config.method
        super().__init__(config, R2D2Head(m.r2d2_lambda_init, m.r2d2_scale_init))

    def episode_loss(self, support: torch.Tensor, query: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # The solve needs fp32: under bf16 autocast the Gram matrix XXᵀ would be rounded to bf16.
        with torch.autocast(support.device.type, enabled=False):
            return self.objective(support, query)


EPISODIC_METHODS: dict[str, Callable[[RunConfig], EpisodicMethod]] = {"protonet": ProtoNet, "r2d2": R2D2}
