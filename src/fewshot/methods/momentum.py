"""Momentum-encoder methods: MoCo v2 and BYOL, contrastive learning without huge batches.

Both keep a second copy of encoder + projector, the *target*, that is not trained by the
optimizer but follows the online weights as an exponential moving average (EMA) after every
step (:meth:`MomentumMethod.after_step`, called by the trainer). The target gives slowly
changing, gradient-free embeddings of the other view:

* MoCo (He et al. 2020; v2: Chen et al. 2020) contrasts each query with its key and with a
  queue of keys from earlier batches, so the number of negatives no longer grows with the batch.
* BYOL (Grill et al. 2020) drops negatives altogether: a predictor on the online side regresses
  the target's projection of the other view.

The target lives in ``method.target``, beside ``method.encoder``; evaluation keeps the online
encoder. It is part of ``state_dict()`` (as are MoCo's queue and pointer), so checkpoints
restore it and a resumed run ends with the same weights.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from fewshot.data.types import Batch
from fewshot.config import RunConfig
from fewshot.distributed import gather_all
from fewshot.methods.contrastive import ProjectionConfig, TwoViewMethod
from fewshot.models.heads import projection_head
from fewshot.objectives.contrastive import BYOLLoss, InfoNCELoss

__all__ = ["BYOL", "MOMENTUM_METHODS", "MoCo", "MomentumMethod", "byol_momentum", "update_momentum"]


def update_momentum(online: nn.Module, target: nn.Module, m: float) -> None:
    """EMA step of ``target`` towards ``online``: θ_t ← m·θ_t + (1 − m)·θ_o for every parameter.

    Buffers (BatchNorm's running statistics) are copied from ``online``, not averaged: they are
    statistics of the online network's activations, not weights to be smoothed. The two modules
    must have the same parameter and buffer names (``target`` a deep copy of ``online``).
    m = 1 leaves the parameters unchanged; m = 0 copies them.

    Raises:
        ValueError: if ``m`` is outside [0, 1] or the two modules do not have the same structure.
    """
    if not 0 <= m <= 1:
        raise ValueError(f"momentum m must lie in [0, 1], got {m}")
    online_params, online_buffers = dict(online.named_parameters()), dict(online.named_buffers())
    target_params, target_buffers = dict(target.named_parameters()), dict(target.named_buffers())
    if online_params.keys() != target_params.keys() or online_buffers.keys() != target_buffers.keys():
        raise ValueError("update_momentum needs two modules with the same parameter and buffer names (a deep copy)")
    with torch.no_grad():
        for name, t in target_params.items():
            t.mul_(m).add_(online_params[name], alpha=1.0 - m)
        for name, b in target_buffers.items():
            b.copy_(online_buffers[name])


def byol_momentum(step: int, total_steps: int, base: float = 0.996) -> float:
    """BYOL's EMA schedule (Grill et al. 2020, §3.2): τ = 1 − (1 − base)·(cos(π·step/total) + 1)/2.

    τ rises from ``base`` at step 0 to 1 at ``step == total_steps``, so the target changes ever
    more slowly and is frozen at the end. ``step`` beyond [0, total_steps] is clamped.

    Raises:
        ValueError: if ``total_steps`` < 1.
    """
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")
    progress = min(max(step / total_steps, 0.0), 1.0)
    return 1.0 - (1.0 - base) * (math.cos(math.pi * progress) + 1.0) / 2.0


class MoCoConfig(ProjectionConfig):
    temperature: float = Field(0.2, gt=0, description="τ of InfoNCE (MoCo v2: 0.2)")
    momentum: float = Field(0.999, ge=0, lt=1, description="EMA factor m of the key encoder, θ_k ← m·θ_k + (1−m)·θ_q (MoCo: 0.999)")
    queue_size: int = Field(65536, ge=1, description="keys K kept in the queue of negatives (MoCo: 65,536 for ImageNet)")


class BYOLConfig(ProjectionConfig):
    momentum_base: float = Field(
        0.996, ge=0, le=1, description="target EMA factor τ_base at step 0; a cosine schedule takes it to 1 at the last step (BYOL: 0.996)"
    )
    predictor_hidden: int = Field(256, ge=1, description="hidden width of the predictor MLP (BYOL: 4096 at ImageNet scale)")


class MomentumMethod(TwoViewMethod):
    """A two-view method with an EMA target (a frozen deep copy of encoder + projector).

    Subclasses write ``forward`` and say which EMA factor applies at a step (``momentum_at``).
    """

    def __init__(self, config: RunConfig, objective: nn.Module) -> None:
        super().__init__(config, objective)
        # Deep-copied at initialisation, so the target starts equal to the online network (both papers).
        # It sits beside .encoder, not inside it, so evaluation never sees it.
        self.target = copy.deepcopy(nn.Sequential(self.encoder, self.projector)).requires_grad_(False)
        self.embed_dim = self._projector_width(config)

    def _projector_width(self, config: RunConfig) -> int:
        m = config.method
        if m.projection_layers:
            return m.projection_dim
        # No MLP: the width is whatever the encoder (and any conv head) emits; one probe tells.
        probe = torch.zeros(2, config.data.channels, config.data.image_size, config.data.image_size)
        was_training = self.training
        self.eval()  # eval mode: the probe must not touch BatchNorm's running statistics
        with torch.no_grad():
            width = self.projector(self.encoder(probe)).shape[1]
        self.train(was_training)
        return width

    def online(self) -> nn.Sequential:
        """The online encoder + projector, laid out like ``target`` (a view, not a registered module)."""
        return nn.Sequential(self.encoder, self.projector)

    def momentum_at(self, step: int, total_steps: int) -> float:
        raise NotImplementedError

    def after_step(self, step: int, total_steps: int) -> None:
        """Move the target towards the online weights (the trainer calls this after each optimizer step)."""
        update_momentum(self.online(), self.target, self.momentum_at(step, total_steps))


class MoCo(MomentumMethod):
    """MoCo v2 (Chen, Fan, Girshick & He 2020, "Improved baselines with momentum contrastive
    learning"; MoCo: He et al. 2020).

    Queries q come from the online encoder + MLP projector, keys k from its EMA copy without
    gradient. Each query's positive is the key of the other view of its image; its negatives
    are the K keys in a queue of earlier batches. The loss is symmetric (MoCo v2 itself used one
    direction; the symmetric form is MoCo v3's and uses both views as queries):

        L = ½ [ InfoNCE(q₁, k₂, queue) + InfoNCE(q₂, k₁, queue) ]

    then both views' keys (from every DDP rank) replace the oldest keys in the queue.

    Departures from the paper: the projector is the shared :func:`projection_head`, which has BatchNorm
    in its hidden layer; and BatchNorm is not shuffled across GPUs (MoCo's "shuffling BN").
    """

    config_class = MoCoConfig

    def __init__(self, config: RunConfig) -> None:
        m = config.method
        super().__init__(config, InfoNCELoss(m.temperature))
        self.momentum = m.momentum
        # Random unit vectors stand in for keys until the first K have been enqueued (as in the paper's code).
        self.register_buffer("queue", F.normalize(torch.randn(m.queue_size, self.embed_dim), dim=1))
        self.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long))  # next slot to overwrite

    def momentum_at(self, step: int, total_steps: int) -> float:
        return self.momentum

    def forward(self, batch: Batch, generator: torch.Generator) -> tuple[torch.Tensor, dict[str, float]]:
        images = batch["images"]
        views = self.both_views(images, generator)
        q1, q2 = self.projector(self.encoder(views)).float().chunk(2)
        with torch.no_grad():
            k1, k2 = self.target(views).float().chunk(2)
        # A snapshot, so that the enqueue below (in place) cannot reach anything the loss's graph holds.
        negatives = self.queue.to(q1.dtype, copy=True)
        loss = 0.5 * (self.objective(q1, k2, negatives) + self.objective(q2, k1, negatives))
        if self.training:
            self._enqueue(F.normalize(torch.cat([k1, k2]), dim=1))
        return loss, {}

    @torch.no_grad()
    def _enqueue(self, keys: torch.Tensor) -> None:
        """Write ``keys`` (and other ranks' keys) into the ring buffer from ``queue_ptr`` on, wrapping at K."""
        keys = gather_all(keys.detach())
        size, n = self.queue.shape[0], keys.shape[0]
        first = max(0, n - size)  # more keys than slots: only the newest K would survive anyway
        slots = (self.queue_ptr + torch.arange(first, n, device=keys.device)) % size
        self.queue.index_copy_(0, slots, keys[first:].to(self.queue.dtype))
        self.queue_ptr.add_(n).remainder_(size)  # on the device: no host sync


class BYOL(MomentumMethod):
    """BYOL (Grill et al. 2020, "Bootstrap your own latent").

    Online: encoder → projector → predictor q; target: EMA copy of encoder → projector, with
    stop-gradient. Each view's prediction regresses the target projection of the other view:

        L = byol_loss(q(z₁), z'₂) + byol_loss(q(z₂), z'₁)

    (the paper's symmetrised L + L̃). The predictor is an MLP of the projector's shape,
    width → ``predictor_hidden`` → width; it and the asymmetric EMA are what keep BYOL from
    collapsing to a constant without negatives. After each step the target moves with
    τ = :func:`byol_momentum` (from ``momentum_base`` to 1 over the run).
    """

    config_class = BYOLConfig

    def __init__(self, config: RunConfig) -> None:
        m = config.method
        super().__init__(config, BYOLLoss())
        self.predictor = projection_head(self.embed_dim, m.predictor_hidden, self.embed_dim)
        self.momentum_base = m.momentum_base

    def momentum_at(self, step: int, total_steps: int) -> float:
        return byol_momentum(step, total_steps, self.momentum_base)

    def forward(self, batch: Batch, generator: torch.Generator) -> tuple[torch.Tensor, dict[str, float]]:
        images = batch["images"]
        views = self.both_views(images, generator)
        p1, p2 = self.predictor(self.projector(self.encoder(views))).float().chunk(2)
        with torch.no_grad():
            z1, z2 = self.target(views).float().chunk(2)
        return self.objective(p1, z2) + self.objective(p2, z1), {}


MOMENTUM_METHODS = {"moco": MoCo, "byol": BYOL}
