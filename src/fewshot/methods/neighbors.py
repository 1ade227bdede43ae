"""Positives from the data: NNCLR's nearest-neighbour positives, optionally with pseudo-classes.

Two views of one image only show the augmentation's variation. Other drawings of the same
character are the positives that matter for one-shot recognition, and an unlabeled set holds
them (Omniglot background: 20 drawers per character). NNCLR (Dwibedi et al. 2021) finds them as
nearest neighbours in a support queue of past embeddings: the positive of view 1 is its
nearest neighbour in the queue, matched against the prediction of view 2 of the same image.

Departures from the paper, each an option:
- ``exclude_self`` (default on): the queue also remembers which image each entry came from (a
  fixed random projection of its raw pixels), and an image is never its own neighbour — with a
  queue as large as this small data set, the nearest entry would otherwise mostly be the same
  image seen an epoch earlier, and the positive would not come from another drawing.
- ``clusters`` > 0 adds pseudo-class training (CACTUs / UFLST-style): every ``cluster_every``
  steps, spherical k-means on the queue; each image of the batch takes the cluster of its
  nearest centroid, and a SupCon loss over both views' projections treats a cluster as a class,
  weighted by ``cluster_weight``. Labels of the data are never read.
- ``neighbor_space=pixels`` starts from pixel neighbours instead (the issue's "normalised-pixel
  neighbours"): the queue holds the input images themselves, each image's positive is its nearest
  queued image by cosine similarity of the pixels (another drawing, never itself), and with
  probability ``neighbor_prob`` the second view is drawn from that neighbour instead of the image;
  the loss is then SimCLR's NT-Xent between the two views (no predictor), so the encoder learns
  what two similar-looking drawings share rather than what one image's augmentations share.
  ``neighbor_prob=0`` is SimCLR itself, the ablation's "no neighbour positives" cell. Clusters
  combine with pixel neighbours: k-means then runs on a second queue, of the projections.
Until the queue holds entries (the first step), a view's own other view stands in as positive.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from fewshot.data.types import Batch
from fewshot.config import RunConfig
from fewshot.methods.contrastive import ProjectionConfig, TwoViewMethod
from fewshot.models.heads import projection_head
from fewshot.objectives.contrastive import nt_xent_loss, supcon_loss
from fewshot.objectives.neighbors import nearest_support, nnclr_loss, spherical_kmeans

_KEY_SEED = 1234  # the fixed random projection that identifies an image by its pixels


class NNCLRConfig(ProjectionConfig):
    temperature: float = Field(0.1, gt=0, description="τ of the NNCLR loss (Dwibedi et al. 2021: 0.1)")
    queue_size: int = Field(2048, ge=1, description="support set size (NNCLR: 98,304 for ImageNet; here most of background-small1)")
    predictor_hidden: int = Field(256, ge=1, description="hidden width of the prediction MLP (NNCLR: 4096)")
    exclude_self: bool = Field(True, description="never take an image's own earlier embedding as its neighbour (see module docstring)")
    clusters: int = Field(0, ge=0, description="pseudo-classes: k of the k-means on the queue; 0 = off")
    cluster_every: int = Field(100, ge=1, description="pseudo-classes: steps between re-clustering")
    cluster_weight: float = Field(1.0, ge=0, description="pseudo-classes: weight of the SupCon loss on clusters")
    cluster_temperature: float = Field(0.1, gt=0, description="pseudo-classes: τ of that SupCon loss (Khosla et al. 2020: 0.1)")
    neighbor_space: Literal["embedding", "pixels"] = Field(
        "embedding", description="embedding: NNCLR's neighbours of the projections; pixels: neighbours of the (normalised) input images"
    )
    neighbor_prob: float = Field(0.5, ge=0, le=1, description="pixels: probability that an image's second view comes from its neighbour")


def image_keys(images: torch.Tensor) -> torch.Tensor:
    """One float per image, k = x·w with w a fixed N(0, 1) vector over the pixels: equal for the
    same raw image, different (almost surely) for different images."""
    g = torch.Generator().manual_seed(_KEY_SEED)
    w = torch.randn(images[0].numel(), generator=g, dtype=torch.float64)
    return images.flatten(1).double().cpu() @ w


class NNCLR(TwoViewMethod):
    """NNCLR: L = ½[nnclr(NN(z₁), p₂) + nnclr(NN(z₂), p₁)] (+ cluster_weight · SupCon on pseudo-classes)."""

    config_class = NNCLRConfig

    def __init__(self, config: RunConfig) -> None:
        m = config.method
        super().__init__(config, nn.Identity())
        self.temperature = m.temperature
        self.exclude_self = m.exclude_self
        width = m.projection_dim
        if m.neighbor_space == "embedding":  # pixel neighbours use SimCLR's loss, which has no predictor
            self.predictor = projection_head(width, m.predictor_hidden, width, 2)
        self.clusters, self.cluster_every = m.clusters, m.cluster_every
        self.cluster_weight, self.cluster_temperature = m.cluster_weight, m.cluster_temperature
        self.register_buffer("queue", torch.zeros(m.queue_size, width))
        self.register_buffer("queue_keys", torch.zeros(m.queue_size, dtype=torch.float64))  # read only up to queue_filled
        self.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long))
        self.register_buffer("queue_filled", torch.zeros(1, dtype=torch.long))
        self.register_buffer("centroids", torch.zeros(max(m.clusters, 1), width))
        self.register_buffer("step_count", torch.zeros(1, dtype=torch.long))
        self.neighbor_space, self.neighbor_prob = m.neighbor_space, m.neighbor_prob
        if m.neighbor_space == "pixels":  # the support set is the images themselves
            pixels = config.data.channels * config.data.image_size**2
            self.register_buffer("queue", torch.zeros(m.queue_size, pixels))
            if m.clusters:  # k-means needs the projections, queued beside the pixels (same slots)
                self.register_buffer("cluster_queue", torch.zeros(m.queue_size, width))

    def neighbours(self, z: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        """The support-set positive of each row of z (B, D): its nearest queue entry, never an
        entry of the same image (with exclude_self) and never z itself (z is not in the queue
        yet); a row without a valid entry keeps z (detached)."""
        filled = int(self.queue_filled)
        if filled == 0:
            return z.detach()
        support = self.queue[:filled]
        excluded = None
        if self.exclude_self:
            excluded = (keys[:, None] == self.queue_keys[None, :filled].cpu()).to(z.device)
        idx = nearest_support(z.detach(), support, excluded)
        out = support[idx.clamp_min(0)]
        return torch.where((idx >= 0)[:, None], out, z.detach())

    @torch.no_grad()
    def _enqueue(self, z: torch.Tensor, keys: torch.Tensor, projections: torch.Tensor | None = None) -> None:
        size, n = self.queue.shape[0], len(z)
        first = max(0, n - size)
        slots = (self.queue_ptr + torch.arange(n - first, device=z.device)) % size
        self.queue.index_copy_(0, slots, z[first:].detach().float())  # raw: neighbours are found by cosine
        if projections is not None:
            self.cluster_queue.index_copy_(0, slots, projections[first:].detach().float())
        self.queue_keys.index_copy_(0, slots.to(self.queue_keys.device), keys[first:].to(self.queue_keys))
        self.queue_ptr.add_(n - first).remainder_(size)
        self.queue_filled.copy_(torch.clamp(self.queue_filled + (n - first), max=size))

    def pixel_neighbour_views(self, images: torch.Tensor, keys: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """neighbor_space=pixels: views (2B, C, H, W) — view 1 of each image, view 2 of its nearest
        queued image (never itself) with probability neighbor_prob, else of the image."""
        partner = images
        if int(self.queue_filled) > 0:
            neighbour = self.neighbours(images.flatten(1).float(), keys).view_as(images).to(images.dtype)
            take = torch.rand(len(images), generator=generator) < self.neighbor_prob
            partner = torch.where(take.to(images.device)[:, None, None, None], neighbour, images)
        views = torch.cat([self.views(images, generator), self.views(partner, generator)])
        return views.contiguous(memory_format=torch.channels_last) if self.channels_last else views

    def cluster_loss(self, z1: torch.Tensor, z2: torch.Tensor, generator: torch.Generator) -> torch.Tensor | None:
        """SupCon over both views with each image's nearest k-means centroid as its class; k-means
        re-run on the queued projections every cluster_every steps; None until the queue holds k."""
        bank = self.cluster_queue if self.neighbor_space == "pixels" else self.queue
        filled = int(self.queue_filled)
        if filled < self.clusters:
            return None
        if int(self.step_count) % self.cluster_every == 0:
            self.centroids.copy_(spherical_kmeans(bank[:filled], self.clusters, generator=generator)[0])
        pseudo = (F.normalize(z1.detach(), dim=1) @ self.centroids.T).argmax(1)
        return supcon_loss(F.normalize(torch.stack([z1, z2], 1), dim=2), pseudo, self.cluster_temperature)

    def forward(self, batch: Batch, generator: torch.Generator) -> tuple[torch.Tensor, dict[str, float]]:
        images = batch["images"]
        keys = image_keys(images)
        if self.neighbor_space == "pixels":
            z1, z2 = self.projector(self.encoder(self.pixel_neighbour_views(images, keys, generator))).float().chunk(2)
            loss = nt_xent_loss(z1, z2, self.temperature)
        else:
            z = self.projector(self.encoder(self.both_views(images, generator))).float()
            p1, p2 = self.predictor(z).chunk(2)
            z1, z2 = z.chunk(2)
            loss = 0.5 * (nnclr_loss(self.neighbours(z1, keys), p2, self.temperature) + nnclr_loss(self.neighbours(z2, keys), p1, self.temperature))
        logs: dict[str, float] = {}
        if self.clusters and (extra := self.cluster_loss(z1, z2, generator)) is not None:
            loss = loss + self.cluster_weight * extra
            logs["cluster_loss"] = float(extra.detach())
        if self.neighbor_space == "pixels":
            self._enqueue(images.flatten(1).float(), keys, z1 if self.clusters else None)
        else:
            self._enqueue(z1, keys)
        self.step_count.add_(1)
        return loss, logs
