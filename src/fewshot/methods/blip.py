"""BLIP (Li et al. 2022, "BLIP: Bootstrapping Language-Image Pre-training"): one text transformer used three ways
over an image tower's tokens, trained with three losses at once,

    L = ITC + ITM + LM.

* Image: the image tower (any registered encoder; ``method.image.init`` starts it from a run, e.g. clip-scenes' conv4)
  gives r (→ the image projection, for ITC) and its tokens (conv4's grid cells; a ViT's tokens) for cross-attention.
* Unimodal text encoder (ITC): [CLS] caption, bidirectional self-attention, no cross-attention; the [CLS] state → the
  text projection. s_ij = ⟨ẑ_i, t̂_j⟩ (ℓ2-normalised); CLIP's symmetric cross-entropy on s / τ, τ learned (initial
  0.07, clamped to [0.001, 0.5] as BLIP's code), identical captions positives.
* Image-grounded text encoder (ITM): [ENC] caption, bidirectional self-attention and cross-attention to the image
  tokens in every block; a 2-way head on the [ENC] state; cross-entropy over the B true pairs, one hard negative text
  per image and one hard negative image per text, drawn ∝ softmax of the ITC similarity over non-positives
  (:func:`fewshot.objectives.blip2.hard_negatives`, BLIP's mining).
* Image-grounded text decoder (LM): [DEC] caption [EOS], causal self-attention, the same cross-attention; an LM head
  predicts each next token; cross-entropy on the caption's tokens and [EOS] (:mod:`fewshot.objectives.captioning`:
  [DEC] and padding never count).

As in the paper, the encoder and decoder share every weight except their self-attention layers (the embeddings,
cross-attention, feed-forward layers and norms are one); the decoder's causal self-attention is its own.
Departures for CPUs: small sizes from scratch (BLIP: ViT-B/16 and BERT-base, 12 layers × 768); no momentum encoder
or momentum distillation (BLIP's ITC uses both; ALBEF's queues too); conv4's grid gives 4 image tokens at 32 px.

:meth:`BLIP.caption_ids` (greedy or nucleus, what CapFilt's captioner samples with) and :meth:`BLIP.match_probability`
(the ITM head's p(match), what CapFilt's filter thresholds) serve CapFilt (:mod:`fewshot.data.capfilt`);
``embed_images`` / ``embed_texts`` make a blip run readable by ``fewshot zeroshot`` and ``fewshot retrieve`` like CLIP.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from fewshot.config import MethodConfig, RunConfig
from fewshot.data.token_ids import BOS_ID, CLS_ID, EOS_ID, PAD_ID
from fewshot.data.types import Batch
from fewshot.errors import ConfigError, DataError
from fewshot.methods.base import Method
from fewshot.methods.vision_language import ImageTowerConfig, decode_captions, image_tower
from fewshot.models.flamingo import image_token_features, image_token_width
from fewshot.models.language import gpt2_init
from fewshot.models.transformer import Attention, TokenTrunk
from fewshot.objectives.blip2 import hard_negatives, itc_loss
from fewshot.objectives.captioning import append_eos, caption_labels, caption_loss

__all__ = ["BLIP", "BLIPConfig", "itm_pairs"]


class BLIPConfig(MethodConfig):
    dim: int = Field(768, ge=8, description="text transformer width (BLIP: 768, BERT-base)")
    depth: int = Field(12, ge=1, description="text transformer blocks, each with cross-attention (BLIP: 12)")
    heads: int = Field(12, ge=1, description="attention heads, dividing dim (BLIP: 12)")
    embed_dim: int = Field(256, ge=1, description="ITC embedding width (BLIP: 256)")
    temperature: float = Field(0.07, gt=0, description="initial ITC τ, learned and clamped to [0.001, 0.5] (BLIP: 0.07)")
    image: ImageTowerConfig = Field(default_factory=ImageTowerConfig)


def itm_pairs(text_of_image: torch.Tensor, image_ok: torch.Tensor, image_of_text: torch.Tensor,
              text_ok: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(image index, text index, label) of ITM's pairs: the B true pairs (label 1), then each image with its hard
    negative text and each text with its hard negative image where one exists (label 0)."""
    b = text_of_image.shape[0]
    rows = torch.arange(b, device=text_of_image.device)
    images = torch.cat([rows, rows[image_ok], image_of_text[text_ok]])
    texts = torch.cat([rows, text_of_image[image_ok], rows[text_ok]])
    labels = torch.cat([torch.ones(b, dtype=torch.long), torch.zeros(len(images) - b, dtype=torch.long)]).to(rows.device)
    return images, texts, labels


class BLIP(Method):
    """Image tower + one text transformer (unimodal encoder / image-grounded encoder / decoder) → ITC + ITM + LM."""

    config_class = BLIPConfig
    inputs = ("images", "tokens", "caption_keys")

    def __init__(self, config: RunConfig) -> None:
        super().__init__()
        m, data = config.method, config.data
        vocab, seq_len = getattr(data, "vocab_size", None), getattr(data, "seq_len", None)
        if vocab is None or seq_len is None:
            raise ConfigError("method 'blip' reads captions: use data.source=pairs (data.vocab_size, data.seq_len)")
        if m.dim % m.heads:
            raise ConfigError(f"method.heads={m.heads} must divide method.dim={m.dim}")
        self.encoder = image_tower(self.build_encoder(config), config, m.image)
        self.image_locked = m.image.lock
        self.enc_id = vocab  # [ENC], the image-grounded encoder's first token: one row past the BPE vocabulary
        self.token_embed = nn.Embedding(vocab + 1, m.dim)
        self.pos_embed = nn.Parameter(torch.zeros(1, seq_len + 2, m.dim))  # [CLS]/[ENC]/[DEC] caption [EOS]
        self.text = TokenTrunk(m.dim, m.depth, m.heads, context_dim=image_token_width(self.encoder))
        self.decoder_attention = nn.ModuleList(Attention(m.dim, m.heads, causal=True) for _ in range(m.depth))
        self.image_projection = nn.Linear(self.encoder.dim, m.embed_dim)
        self.text_projection = nn.Linear(m.dim, m.embed_dim)
        self.itm_head = nn.Linear(m.dim, 2)
        self.lm_head = nn.Linear(m.dim, vocab)
        for part in (self.text, self.decoder_attention, self.lm_head, self.itm_head, self.token_embed):
            part.apply(gpt2_init)
        nn.init.normal_(self.pos_embed, std=0.02)
        self.log_temperature = nn.Parameter(torch.tensor(math.log(m.temperature)))
        self.max_caption = seq_len

    def train(self, mode: bool = True) -> "BLIP":
        super().train(mode)
        if self.image_locked:
            self.encoder.eval()
        return self

    def temperature(self) -> torch.Tensor:
        return self.log_temperature.exp().clamp(0.001, 0.5)

    # ------------------------------------------------------------------ the three uses of the text transformer

    def image_tokens(self, images: torch.Tensor) -> torch.Tensor:
        return image_token_features(self.encoder, images)

    def text_states(self, ids: torch.Tensor, image_tokens: torch.Tensor | None = None, decoder: bool = False) -> torch.Tensor:
        """States (B, T, dim) of ``ids`` (first token then caption, PAD-padded): without ``image_tokens`` the unimodal
        encoder (no cross-attention); with them the image-grounded encoder, or with ``decoder`` the decoder (its own
        causal self-attention; every other weight shared)."""
        if ids.shape[1] > self.pos_embed.shape[1]:
            raise DataError(f"captions of {ids.shape[1] - 1} tokens exceed the text transformer's {self.pos_embed.shape[1] - 2} "
                            "(data.seq_len): truncate them")
        if decoder and image_tokens is None:
            raise ValueError("the decoder reads the image: pass image_tokens")
        padding = ids == PAD_ID
        mask = padding if bool(padding.any()) else None
        x = self.token_embed(ids) + self.pos_embed[:, : ids.shape[1]]
        for block, own in zip(self.text.blocks, self.decoder_attention):
            x = x + (own if decoder else block.attn)(block.norm1(x), padding_mask=mask)
            if image_tokens is not None:
                x = x + block.cross(block.norm_cross(x), context=image_tokens)
            x = x + block.mlp(block.norm2(x))
        return self.text.norm(x)

    @staticmethod
    def _first(tokens: torch.Tensor, first: int) -> torch.Tensor:
        return torch.cat([torch.full((tokens.shape[0], 1), first, dtype=tokens.dtype, device=tokens.device), tokens], dim=1)

    def embed_images(self, images: torch.Tensor) -> torch.Tensor:
        """ITC image embeddings (B, embed_dim), not normalised: the projected r."""
        return self.image_projection(self.encoder(images))

    def embed_texts(self, tokens: torch.Tensor) -> torch.Tensor:
        """ITC text embeddings (B, embed_dim), not normalised: the unimodal encoder's projected [CLS] state."""
        return self.text_projection(self.text_states(self._first(tokens, CLS_ID))[:, 0])

    def match_logits(self, image_tokens: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """ITM logits (B, 2) [no match, match] of image tokens i with caption i: the head on the [ENC] state."""
        return self.itm_head(self.text_states(self._first(tokens, self.enc_id), image_tokens)[:, 0])

    def decoder_logits(self, image_tokens: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Next-token logits (B, T + 1, vocab) at every position of [DEC] ids."""
        return self.lm_head(self.text_states(self._first(ids, BOS_ID), image_tokens, decoder=True))

    def lm_loss(self, image_tokens: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Cross-entropy of caption ⊕ [EOS] after [DEC], the image visible; [DEC] and padding never count."""
        ids = append_eos(tokens, EOS_ID, PAD_ID)
        return caption_loss(self.decoder_logits(image_tokens, ids), caption_labels(1, ids, PAD_ID))

    # ------------------------------------------------------------------ the step

    def forward(self, batch: Batch, generator: torch.Generator) -> tuple[torch.Tensor, dict[str, float]]:
        images, tokens, keys = batch["images"], batch["tokens"], batch.get("caption_keys")
        image_tokens = self.image_tokens(images)
        z = F.normalize(self.embed_images(images).float(), dim=-1)
        t = F.normalize(self.embed_texts(tokens).float(), dim=-1)
        similarity = z @ t.T
        itc = itc_loss(similarity, self.temperature(), keys)
        pair_images, pair_texts, labels = itm_pairs(*hard_negatives(similarity, generator, keys))
        itm = F.cross_entropy(self.match_logits(image_tokens[pair_images], tokens[pair_texts]), labels)
        lm = self.lm_loss(image_tokens, tokens)
        logs = {"itc": itc, "itm": itm, "lm": lm, "temperature": self.temperature()}
        return itc + itm + lm, {name: float(value.detach()) for name, value in logs.items()}

    # ------------------------------------------------------------------ CapFilt's captioner and filter

    @torch.no_grad()
    def match_probability(self, images: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """p(match) (B,) of image i with caption i under the ITM head."""
        return self.match_logits(self.image_tokens(images), tokens).float().softmax(dim=-1)[:, 1]

    @torch.no_grad()
    def caption_ids(self, images: torch.Tensor, decoding: str = "greedy", max_tokens: int | None = None, top_p: float = 0.9,
                    generator: torch.Generator | None = None, **_: Any) -> list[list[int]]:
        """Caption ids of images (B, C, H, W) from the decoder, each cut before its [EOS]: ``greedy`` or ``nucleus``."""
        was = self.training
        self.eval()
        image_tokens = self.image_tokens(images)
        out = decode_captions(lambda ids: self.decoder_logits(image_tokens, ids)[:, -1], images.shape[0],
                              min(max_tokens or self.max_caption, self.max_caption), decoding, EOS_ID, top_p, generator, images.device)
        self.train(was)
        return out
