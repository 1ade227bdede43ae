"""Frozen (Tsimpoukelli et al. 2021, "Multimodal Few-Shot Learning with Frozen Language Models"): an image encoder
trained from scratch, through a frozen causal LM, to caption; its output is linearly mapped to k prefix embeddings.

    prefix(x) = reshape_k(W f(x) + b),   f: the run's encoder (``encoder.name``, from scratch), W: dim(f) → k·D

with D the LM's embedding width and k = ``method.prefix_length`` = 2 (the paper's choice: an NF-ResNet-50's
pooled output mapped to 2 tokens). The loss is ClipCap's captioning cross-entropy
(:mod:`fewshot.methods.prefix_captioning`): start ids ⊕ prefix ⊕ caption ⊕ EOS, on the caption and EOS only.
Unlike ClipCap, the encoder itself learns; the LM (``method.lm.init``: a fewshot gpt run, a Hugging Face causal LM
folder or ``smollm2``) is always frozen — no gradient, eval mode (no dropout), and its weights bit-identical after
training: a run whose LM moved is refused before it is saved.

``method.image.init`` starts the encoder from another run's image tower (e.g. a clip-scenes run's conv4) and trains it
on, as the paper starts from an NF-ResNet-50 pre-trained on ImageNet; ``method.image.lock=true`` freezes it (then
only W and b learn).

``method.blind=true`` is the train-blind baseline: every training image is replaced by a blank (all-zero) one, so
the encoder learns only a constant prefix, the captions' prior.

Departures, for small data and CPUs: a conv4 encoder at 32 px (the paper: NF-ResNet-50 at 224 px), fewshot's
small caption-trained GPT as the default LM (the paper: a 7B transformer trained on C4).
"""

from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from fewshot.config import MethodConfig, RunConfig
from fewshot.data.types import Batch
from fewshot.methods.prefix_captioning import PrefixCaptioner, open_caption_lm
from fewshot.methods.vision_language import ImageTowerConfig, image_tower

__all__ = ["Frozen", "FrozenConfig"]


class FrozenLM(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)
    init: str | None = Field(None, description="the frozen causal LM: a fewshot gpt run folder, a Hugging Face causal LM folder, or smollm2")


class FrozenConfig(MethodConfig):
    prefix_length: int = Field(2, ge=1, description="k prefix embeddings the encoder's output is mapped to (Tsimpoukelli et al. 2021: 2)")
    blind: bool = Field(False, description="the train-blind baseline: the encoder sees only blank images")
    lm: FrozenLM = Field(default_factory=FrozenLM)
    image: ImageTowerConfig = Field(default_factory=ImageTowerConfig)


class Frozen(PrefixCaptioner):
    """Image encoder (trained) → linear map → k prefix embeddings → a frozen LM's caption cross-entropy."""

    config_class = FrozenConfig

    def __init__(self, config: RunConfig) -> None:
        super().__init__()
        m = config.method
        self.encoder = image_tower(self.build_encoder(config), config, m.image)
        self.image_locked = m.image.lock
        self.language_model = open_caption_lm(config)
        self.freeze_lm()
        self.prefix_length, self.blind = m.prefix_length, m.blind
        self.set_max_tokens(config)
        self.to_prefix = nn.Linear(self.encoder.dim, m.prefix_length * self.language_model.dim)
        self.train()

    def train(self, mode: bool = True) -> "Frozen":
        super().train(mode)
        if getattr(self, "image_locked", False):
            self.encoder.eval()  # a locked tower keeps its normalisation statistics too
        return self

    def prefix(self, images: torch.Tensor) -> torch.Tensor:
        """The k prefix embeddings (B, k, D): W f(images) + b, reshaped."""
        return self.to_prefix(self.encoder(images)).view(images.shape[0], self.prefix_length, -1)

    def forward(self, batch: Batch, generator: torch.Generator) -> tuple[torch.Tensor, dict[str, float]]:
        images = torch.zeros_like(batch["images"]) if self.blind else batch["images"]
        return self.caption_step(images, batch["tokens"]), {}
