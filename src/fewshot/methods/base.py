"""What every pre-training method is to the one trainer and the evaluator."""

from __future__ import annotations

import torch
from torch import nn

from fewshot.config import MethodConfig, RunConfig
from fewshot.data.types import Batch
from fewshot.models.encoders import create_encoder


class Method(nn.Module):
    """A pre-training method: ``.encoder`` (the product evaluation keeps) plus one training step.

    ``forward(batch, generator) -> (loss, logs)`` is the step the trainer calls on a batch from
    ``data.batch(idx)``, a mapping of named tensors of which the method reads ``inputs`` (checked
    against the data's keys when the trainer builds it, not at the first step); ``generator`` is the checkpointed CPU generator every random
    draw (views, masks, episodes) must use so a resumed run repeats the uninterrupted one.
    ``after_step(step, total_steps)`` runs after each optimizer step (EMA targets, queues).
    ``lr_scale(name)`` is a trainable parameter's learning rate ÷ ``train.lr`` (1 unless a method says otherwise).
    ``views_per_sample`` is how many encoder inputs one sample becomes (2 for two-view methods),
    so throughput is reported as views/s across methods.
    """

    config_class: type[MethodConfig] = MethodConfig  # its recipe section, the paper's values as defaults
    inputs: tuple[str, ...] = ("images",)  # the batch keys forward reads; the trainer checks the data has them
    views_per_sample = 1
    encoder: nn.Module

    @classmethod
    def build_encoder(cls, config: RunConfig) -> nn.Module:
        """The encoder alone, as this method builds it: what ``Run.encoder`` loads weights into, so
        adapting or evaluating a run never builds heads, targets or queues."""
        data = config.data
        return create_encoder(config.encoder.name, data.channels, data.image_size, **config.encoder.options)

    def forward(self, batch: Batch, generator: torch.Generator) -> tuple[torch.Tensor, dict[str, float]]:
        raise NotImplementedError

    def after_step(self, step: int, total_steps: int) -> None:
        """Per-step extras after the optimizer step; nothing by default."""

    def lr_scale(self, name: str) -> float:
        """The learning rate of parameter ``name`` (as in ``named_parameters``) ÷ ``train.lr``; 1 by default."""
        return 1.0
