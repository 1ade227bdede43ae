"""Time-contrastive learning on ordered frames (R3M's TCN loss: Nair et al. 2022, after
Sermanet et al. 2018, "Time-contrastive networks").

Frames close in time should embed close together, frames far apart further: from every
sequence of a batch one anchor frame, one positive within ``method.positive_window`` frames
of it, and one negative at least ``method.negative_gap`` frames away and always further than
the positive; the anchors of the other sequences are negatives too. Similarity is the
negative squared L2 distance, the loss InfoNCE (:func:`~fewshot.objectives.contrastive.time_contrastive_loss`).
"""

from __future__ import annotations

import torch
from pydantic import Field

from fewshot.data.types import Batch
from fewshot.config import RunConfig
from fewshot.errors import ConfigError
from fewshot.methods.base import Method
from fewshot.methods.contrastive import ProjectionConfig, encoder_projector_views
from fewshot.objectives.contrastive import time_contrastive_loss

__all__ = ["TimeContrastive", "sample_frame_triplets"]


def sample_frame_triplets(
    batch: int, frames: int, positive_window: int, negative_gap: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Frame indices (anchor, positive, negative), each (batch,) int64, one triplet per sequence of T frames.

    With d⁺ = |positive − anchor| and d⁻ = |negative − anchor|, every triplet keeps
    1 ≤ d⁺ ≤ W (the window) and d⁻ ≥ max(G, d⁺ + 1) (the gap, and further than the positive),
    all on one side of the anchor. Drawn as: d⁺ ~ U{1..W}; anchor ~ U{0..T−1−max(G, d⁺+1)};
    d⁻ ~ U{max(G, d⁺+1)..T−1−anchor}; then, with probability ½, time is reversed (t → T−1−t), so
    the negative lies before the anchor as often as after (R3M uses both orders: its two loss
    terms anchor the earliest and the latest of three ordered frames). One CPU draw of (batch, 4)
    uniforms from ``generator``.

    Raises:
        ConfigError: if T < max(G, W + 1) + 1, too few frames for any triplet.
    """
    need = max(negative_gap, positive_window + 1) + 1
    if frames < need:
        raise ConfigError(
            f"sequences of {frames} frames are too short for method.positive_window={positive_window} and "
            f"method.negative_gap={negative_gap}: at least {need} frames needed"
        )
    u = torch.rand(batch, 4, generator=generator, dtype=torch.float64)
    d_pos = 1 + (u[:, 0] * positive_window).long()
    d_min = torch.clamp(d_pos + 1, min=negative_gap)
    anchor = (u[:, 1] * (frames - d_min)).long()
    d_neg = d_min + (u[:, 2] * (frames - anchor - d_min)).long()
    positive, negative = anchor + d_pos, anchor + d_neg
    flip = u[:, 3] < 0.5
    last = frames - 1
    return (
        torch.where(flip, last - anchor, anchor),
        torch.where(flip, last - positive, positive),
        torch.where(flip, last - negative, negative),
    )


class TimeContrastiveConfig(ProjectionConfig):
    positive_window: int = Field(2, ge=1, description="the positive frame lies 1..W frames from the anchor")
    negative_gap: int = Field(4, ge=1, description="the same-sequence negative lies ≥ this many frames from the anchor (and farther than the positive)")
    temperature: float = Field(1.0, gt=0, description="τ of the TCN InfoNCE (R3M, Nair et al. 2022: 1, the raw negative distance)")
    l2_reg: float = Field(0.0, ge=0, description="weight of the embedding-norm regulariser")


class TimeContrastive(Method):
    """R3M-style time-contrastive learning: frames → (views) → encoder → projector → TCN InfoNCE.

    Inputs are sequences (B, T, C, H, W) (``data.source=sequences`` or ``moving-shapes``). The
    three chosen frames of every sequence go through ``views`` independently (``views.name=none``
    for none; R3M random-crops) and through one encoder pass of 3B images. The projector
    (``method.projection_conv_blocks`` conv blocks, then ``method.projection_layers`` MLP layers;
    0 and 0 = none, as R3M puts the loss on the encoder output) is dropped after pre-training.
    Under DDP the other-sequence negatives are those of the process's own batch. Loss: :func:`time_contrastive_loss` with the same-sequence
    negative and the other sequences' anchors, τ = ``method.temperature`` and
    λ = ``method.l2_reg``.
    """

    inputs = ("frames",)
    config_class = TimeContrastiveConfig

    views_per_sample = 3

    def __init__(self, config: RunConfig) -> None:
        super().__init__()
        m = config.method
        self.encoder, self.projector, self.views = encoder_projector_views(config)
        self.positive_window, self.negative_gap = m.positive_window, m.negative_gap
        self.temperature, self.l2_reg = m.temperature, m.l2_reg
        self.channels_last = config.train.channels_last

    def forward(self, batch: Batch, generator: torch.Generator) -> tuple[torch.Tensor, dict[str, float]]:
        frames = batch["frames"]
        if frames.ndim != 5:
            raise ConfigError(
                f"time-contrastive trains on sequences (B, T, C, H, W), got a batch of shape {tuple(frames.shape)}; "
                "use data.source=sequences or moving-shapes"
            )
        b, t = frames.shape[:2]
        picks = torch.stack(sample_frame_triplets(b, t, self.positive_window, self.negative_gap, generator))  # (3, B)
        rows = torch.arange(b).expand(3, b)
        x = frames[rows.to(frames.device), picks.to(frames.device)].flatten(0, 1)  # (3B, C, H, W): anchors, positives, negatives
        x = self.views(x, generator)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        anchor, positive, negative = self.projector(self.encoder(x)).float().chunk(3)
        loss = time_contrastive_loss(anchor, positive, negative[:, None], self.temperature, True, self.l2_reg)
        return loss, {}
