"""Multimodal-CoT (Zhang et al. 2023, "Multimodal Chain-of-Thought Reasoning in Language Models"): two models of
one architecture, both fine-tuned — stage 1 writes a rationale from image + question, stage 2 the answer from
image + question + that rationale — against a direct-answer model and a blind one.

The architecture: an image encoder (``encoder.name``; from scratch, or from a run's image tower with
``method.image.init``, e.g. a clip-scenes run: pre-trained vision features as the paper's DETR; trained either way) → linear → k prefix embeddings, then the prompt's
tokens, into a causal LM (``method.lm.init``: a fewshot gpt run, a Hugging Face causal LM folder or ``smollm2``),
tuned with it by default (``method.lm.tune``; false freezes it, bit-identical, as Frozen does). What the model
learns to write is the data's ``data.target`` (:mod:`fewshot.data.scene_questions`): the sequence is

    start ids ⊕ prefix(x) ⊕ prompt ⊕ target ⊕ EOS,   L = −(1/|M|) Σ_{j ∈ M} log p(s_j | s_<j),   M = target ⊕ EOS

so the image and the prompt are given, never predicted. ``method.blind=true`` is the text-only baseline: every image
is blank (all zeros) in training and at test time.

Departures, for CPUs: the paper fuses DETR patch features into a T5 encoder by gated cross-attention; here the image
enters as a short prefix of a decoder-only LM (Frozen's and ClipCap's link), and the LM is the small scene-text GPT.
"""

from __future__ import annotations

import torch
from pydantic import Field
from torch import nn

from fewshot.config import MethodConfig, RunConfig
from fewshot.data.scene_questions import SOURCE, SceneQuestionsDataConfig
from fewshot.data.token_ids import IGNORE_INDEX, PAD_ID
from fewshot.data.types import Batch
from fewshot.errors import ConfigError
from fewshot.methods.clipcap import ClipCapImage, ClipCapLM
from fewshot.methods.prefix_captioning import PrefixCaptioner, open_caption_lm
from fewshot.methods.vision_language import load_image_tower
from fewshot.models.prefix_lm import greedy
from fewshot.objectives.captioning import append_eos, caption_labels, caption_loss

__all__ = ["MultimodalCoT", "MultimodalCoTConfig", "answer_labels"]


class MMCoTLM(ClipCapLM):
    tune: bool = Field(True, description="fine-tune the LM with the image encoder (the paper fine-tunes both stages); false: frozen")


class MMCoTImage(ClipCapImage):
    init: str | None = Field(None, description="a fewshot run folder (e.g. clip-scenes) whose image tower starts the encoder, "
                             "then fine-tuned; null: from scratch")


class MultimodalCoTConfig(MethodConfig):
    prefix_length: int = Field(4, ge=1, description="k prefix embeddings the image encoder's output is mapped to")
    blind: bool = Field(False, description="the text-only baseline: every image is blank, in training and at test time")
    image: MMCoTImage = Field(default_factory=MMCoTImage)
    lm: MMCoTLM = Field(default_factory=MMCoTLM)


def answer_labels(before: int, ids: torch.Tensor, prompt_lengths: torch.Tensor, pad_id: int = PAD_ID) -> torch.Tensor:
    """Labels (B, before + L) of ``before`` positions (start ids + prefix) then ``ids`` (B, L) = prompt ⊕ target ⊕ EOS
    ⊕ padding: the ids of the target and its EOS, IGNORE_INDEX everywhere else (prefix, prompt, padding)."""
    labels = caption_labels(before, ids, pad_id)
    in_prompt = torch.arange(ids.shape[1], device=ids.device)[None, :] < prompt_lengths.to(ids.device)[:, None]
    labels[:, before:] = labels[:, before:].masked_fill(in_prompt, IGNORE_INDEX)
    return labels


class MultimodalCoT(PrefixCaptioner):
    """Image encoder → linear → k prefix embeddings ⊕ prompt → a causal LM that writes the target."""

    config_class = MultimodalCoTConfig
    inputs = ("images", "tokens", "prompt_lengths")

    def __init__(self, config: RunConfig) -> None:
        super().__init__()
        m = config.method
        if not isinstance(config.data, SceneQuestionsDataConfig):
            raise ConfigError(f"method 'mm-cot' trains on questions with a prompt and a target: set data.source={SOURCE} "
                              f"(got {config.data.source})")
        self.encoder = self.build_encoder(config)
        if m.image.init is not None:
            load_image_tower(self.encoder, config, m.image.init)
        self.language_model = open_caption_lm(config)
        if not m.lm.tune:
            self.freeze_lm()
        self.prefix_length, self.blind = m.prefix_length, m.blind
        self.target, self.image_size = config.data.target, config.data.image_size
        self.set_max_tokens(config)
        self.to_prefix = nn.Linear(self.encoder.dim, m.prefix_length * self.language_model.dim)
        self.train()

    def prefix(self, images: torch.Tensor) -> torch.Tensor:
        """The k prefix embeddings (B, k, D) of images (blank ones when the model is blind)."""
        if self.blind:
            images = torch.zeros_like(images)
        return self.to_prefix(self.encoder(images)).view(images.shape[0], self.prefix_length, -1)

    def forward(self, batch: Batch, generator: torch.Generator) -> tuple[torch.Tensor, dict[str, float]]:
        link = self.language_model
        ids = append_eos(batch["tokens"], link.eos_id, PAD_ID)
        logits = self.caption_logits(self.prefix(batch["images"]), ids)
        labels = answer_labels(len(link.start_ids) + self.prefix_length, ids, batch["prompt_lengths"])
        return caption_loss(logits, labels), {}

    @torch.no_grad()
    def complete(self, images: torch.Tensor, prompts: list[str], max_tokens: int | None = None, batch_size: int = 64) -> list[str]:
        """Greedy continuations of ``prompts`` after each image's prefix (images (B, C, H, W) in [0, 1]), cut at EOS.

        Rows are decoded in groups of equal prompt length (the LM has no padding mask); each generates at most
        ``max_tokens`` (default: the training rows' length less the prompt) and never past the LM's context."""
        if len(prompts) != len(images):
            raise ConfigError(f"{len(prompts)} prompts for {len(images)} images")
        was = self.training
        self.eval()
        link = self.language_model
        ids = [link.tokenizer.encode(p, add_special_tokens=False).ids for p in prompts]
        out: list[str] = [""] * len(prompts)
        by_length: dict[int, list[int]] = {}
        for i, row in enumerate(ids):
            by_length.setdefault(len(row), []).append(i)
        for n, rows in by_length.items():
            room = link.context - len(link.start_ids) - self.prefix_length - n  # positions left to generate in
            if room < 1:
                raise ConfigError(f"a prompt of {n} tokens after {len(link.start_ids) + self.prefix_length} start and prefix positions "
                                  f"leaves nothing to generate in {link.name}'s context of {link.context}: {1 - room} position(s) too many")
            for start in range(0, len(rows), batch_size):
                chunk = rows[start : start + batch_size]
                prompt = torch.tensor([ids[i] for i in chunk], dtype=torch.long, device=images.device).view(len(chunk), n)
                prefix = torch.cat([self.prefix(images[chunk]), link.embed(prompt).to(images.dtype)], dim=1)
                budget = min(max_tokens or max(1, self.max_tokens - n), room)
                for i, row in zip(chunk, greedy(link, prefix, budget)):
                    out[i] = link.decode(row).strip()
        self.train(was)
        return out
