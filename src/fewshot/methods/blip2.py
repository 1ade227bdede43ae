"""BLIP-2 (Li et al. 2023): a Q-Former between a frozen image tower and a frozen causal LM, in two stages.

``blip2-qformer`` (stage 1, representation learning): the image tower of ``method.image.init`` (a fewshot run
folder, e.g. a ``clip-scenes`` run's conv4) is frozen; its tokens (a ViT's, conv4's grid cells) are what the
queries cross-attend. The Q-Former (:mod:`fewshot.models.qformer`) is trained with three losses at once, each
under its own mask (:mod:`fewshot.objectives.blip2`):

    L = ITC + ITM + ITG

* ITC (unimodal mask): queries alone → a linear map → ℓ2-normalised z_i1 … z_iQ; the text [CLS] caption alone →
  the [CLS] state → a linear map → ℓ2-normalised t_j; s_ij = max_q ⟨z_iq, t_j⟩; CLIP's symmetric cross-entropy
  on s / τ, τ learned (initial 0.07, clamped to [0.001, 0.5] as BLIP-2's code), identical captions positives.
* ITM (bidirectional mask): the B true pairs, and for every image a hard negative text and for every text a
  hard negative image drawn from softmax(s) (BLIP's mining); a 2-way linear head on each query's state,
  averaged over the queries; cross-entropy on match / no match.
* ITG (multimodal-causal mask): [DEC] caption [EOS] (BLIP-2 puts [DEC], here the vocabulary's [BOS], in place of
  [CLS]); each text position sees all queries and the text before it; a linear LM head predicts the next token;
  cross-entropy on the caption's tokens and [EOS] (padding never counts).

Captions are the pairs' own BPE ids (``data.vocab_size``), as CLIP's text tower reads them.

``blip2`` (stage 2, generative learning): the Q-Former and image tower of a stage-1 run (``method.qformer.init``),
the queries alone (no text), a linear map to the LM's width: the Q query outputs are a soft prompt of Q
embeddings before the caption in the frozen LM (``method.lm.init``: a fewshot gpt run, a Hugging Face causal LM
folder or smollm2), trained with the captioning loss of :class:`~fewshot.methods.prefix_captioning.PrefixCaptioner`.
Trained: the Q-Former and the map; frozen: the image tower and the LM (bit-identical, checked when saved).

Departures for CPUs and small data: a small Q-Former from scratch (BLIP-2: 32 queries, BERT-base initialised,
768 wide, 12 layers; the recipes: 8 queries, 128 wide, 4 layers), pre-norm layers.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from fewshot.config import MethodConfig, RunConfig
from fewshot.data.token_ids import BOS_ID, CLS_ID, EOS_ID, PAD_ID
from fewshot.data.types import Batch
from fewshot.errors import CheckpointError, ConfigError
from fewshot.io import CHECKPOINT_FORMAT, CHECKPOINT_FORMAT_VERSION, read_file_pair
from fewshot.methods.base import Method
from fewshot.methods.clipcap import ClipCapImage, ClipCapLM
from fewshot.methods.prefix_captioning import PrefixCaptioner, open_caption_lm
from fewshot.methods.vision_language import check_same_image_tower, load_image_tower
from fewshot.models.flamingo import image_token_features, image_token_width
from fewshot.models.qformer import QFormer
from fewshot.objectives.blip2 import hard_negatives, itc_loss, itc_similarity
from fewshot.objectives.captioning import append_eos, caption_labels, caption_loss

__all__ = ["BLIP2Captioner", "BLIP2CaptionerConfig", "BLIP2QFormer", "BLIP2QFormerConfig"]


class BLIP2QFormerConfig(MethodConfig):
    queries: int = Field(32, ge=1, description="learned queries (BLIP-2: 32)")
    dim: int = Field(768, ge=8, description="Q-Former width (BLIP-2: 768, BERT-base)")
    depth: int = Field(12, ge=1, description="Q-Former layers (BLIP-2: 12)")
    heads: int = Field(12, ge=1, description="attention heads, dividing dim (BLIP-2: 12)")
    cross_every: int = Field(2, ge=1, description="queries cross-attend the image in every n-th layer (BLIP-2: 2)")
    embed_dim: int = Field(256, ge=1, description="ITC embedding width (BLIP-2: 256)")
    image: ClipCapImage = Field(default_factory=ClipCapImage)


class BLIP2CaptionerConfig(MethodConfig):
    qformer: ClipCapImage = Field(default_factory=ClipCapImage)  # its init: the stage-1 run folder
    lm: ClipCapLM = Field(default_factory=ClipCapLM)  # tune refused: BLIP-2 keeps the LM frozen


def _frozen_image_tower(method: Method, config: RunConfig, path: str | None, name: str) -> nn.Module:
    """The image encoder of the run at ``path``, frozen (no gradient; eval mode kept by the method's ``train``)."""
    if path is None:
        raise ConfigError(f"method '{name}' reads a frozen image tower: set method.image.init=RUN_DIR (e.g. a clip-scenes run)")
    return load_image_tower(method.build_encoder(config), config, path).requires_grad_(False)


def build_qformer(m: BLIP2QFormerConfig, image_dim: int, vocab_size: int, max_len: int) -> QFormer:
    if m.dim % m.heads:
        raise ConfigError(f"method.heads={m.heads} must divide method.dim={m.dim}")
    return QFormer(image_dim, m.dim, m.depth, m.heads, m.queries, vocab_size, max_len, m.cross_every, PAD_ID)


class _FrozenImageTower(Method):
    """What both stages share: a frozen image encoder whose tokens the queries read."""

    def train(self, mode: bool = True) -> "_FrozenImageTower":
        super().train(mode)
        self.encoder.eval()  # frozen: BatchNorm statistics stay as loaded
        return self

    def image_tokens(self, images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return image_token_features(self.encoder, images)


class BLIP2QFormer(_FrozenImageTower):
    """Stage 1: the Q-Former over frozen image tokens, trained with ITC + ITM + ITG."""

    config_class = BLIP2QFormerConfig
    inputs = ("images", "tokens", "caption_keys")

    def __init__(self, config: RunConfig) -> None:
        super().__init__()
        m = config.method
        self.encoder = _frozen_image_tower(self, config, m.image.init, "blip2-qformer")
        vocab = getattr(config.data, "vocab_size", None)
        seq_len = getattr(config.data, "seq_len", None)
        if vocab is None or seq_len is None:
            raise ConfigError("method 'blip2-qformer' reads captions: use data.source=pairs (data.vocab_size, data.seq_len)")
        self.qformer = build_qformer(m, image_token_width(self.encoder), vocab, seq_len + 2)  # [CLS]/[DEC] … [EOS]
        self.image_projection = nn.Linear(m.dim, m.embed_dim)
        self.text_projection = nn.Linear(m.dim, m.embed_dim)
        self.itm_head = nn.Linear(m.dim, 2)
        self.lm_head = nn.Linear(m.dim, vocab)
        self.log_temperature = nn.Parameter(torch.tensor(math.log(0.07)))
        self.train()

    def temperature(self) -> torch.Tensor:
        return self.log_temperature.exp().clamp(0.001, 0.5)

    # ------------------------------------------------------------------ the three heads

    def image_embeddings(self, image_tokens: torch.Tensor) -> torch.Tensor:
        """ℓ2-normalised query embeddings (B, Q, E) of the queries alone."""
        queries, _ = self.qformer(image_tokens, None)
        return F.normalize(self.image_projection(queries), dim=-1)

    def text_embeddings(self, tokens: torch.Tensor) -> torch.Tensor:
        """ℓ2-normalised [CLS] embeddings (B, E) of the text alone."""
        _, text = self.qformer(None, self._with_first(tokens, CLS_ID))
        return F.normalize(self.text_projection(text[:, 0]), dim=-1)

    def match_logits(self, image_tokens: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """ITM logits (B, 2) of image i with text i: the 2-way head on each query's state, averaged over queries."""
        queries, _ = self.qformer(image_tokens, self._with_first(tokens, CLS_ID), "bidirectional")
        return self.itm_head(queries).mean(dim=1)

    def generation_loss(self, image_tokens: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """ITG: next-token cross-entropy of [DEC] caption [EOS] with the queries visible, padding ignored."""
        ids = self._with_first(append_eos(tokens, EOS_ID, PAD_ID), BOS_ID)
        _, text = self.qformer(image_tokens, ids, "multimodal-causal")
        return caption_loss(self.lm_head(text), caption_labels(1, ids[:, 1:], PAD_ID))

    @staticmethod
    def _with_first(tokens: torch.Tensor, first: int) -> torch.Tensor:
        return torch.cat([torch.full_like(tokens[:, :1], first), tokens], dim=1)

    def forward(self, batch: Batch, generator: torch.Generator) -> tuple[torch.Tensor, dict[str, float]]:
        images, tokens, keys = batch["images"], batch["tokens"], batch.get("caption_keys")
        image_tokens = self.image_tokens(images)
        similarity = itc_similarity(self.image_embeddings(image_tokens), self.text_embeddings(tokens))
        itc = itc_loss(similarity, self.temperature(), keys)

        text_of_image, image_ok, image_of_text, text_ok = hard_negatives(similarity, generator, keys)
        b = images.shape[0]
        rows = torch.arange(b, device=images.device)
        pair_images = torch.cat([rows, rows[image_ok], image_of_text[text_ok]])
        pair_texts = torch.cat([rows, text_of_image[image_ok], rows[text_ok]])
        labels = torch.cat([torch.ones(b, dtype=torch.long), torch.zeros(len(pair_images) - b, dtype=torch.long)]).to(images.device)
        itm = F.cross_entropy(self.match_logits(image_tokens[pair_images], tokens[pair_texts]), labels)

        itg = self.generation_loss(image_tokens, tokens)
        loss = itc + itm + itg
        logs = {"itc": itc, "itm": itm, "itg": itg, "temperature": self.temperature()}
        return loss, {name: float(value.detach()) for name, value in logs.items()}


def _stage1_run(path: str | None) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(stored config, model tensors) of a ``blip2-qformer`` run folder, hash checked."""
    if path is None:
        raise ConfigError("method 'blip2' starts from a stage-1 run: set method.qformer.init=RUN_DIR (a blip2-qformer run)")
    file = Path(path) / "checkpoints" / "last.safetensors" if Path(path).is_dir() else Path(path)
    meta, tensors = read_file_pair(file, CHECKPOINT_FORMAT, CHECKPOINT_FORMAT_VERSION, "checkpoint")
    stored = meta.get("config", {})
    if stored.get("method", {}).get("name") != "blip2-qformer":
        raise CheckpointError(f"method.qformer.init '{path}' is not a blip2-qformer run (method "
                              f"{stored.get('method', {}).get('name', 'unknown')})")
    return stored, {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}


class BLIP2Captioner(_FrozenImageTower, PrefixCaptioner):
    """Stage 2: the stage-1 Q-Former's query outputs, mapped to the LM's width, as a soft prompt into a frozen LM."""

    config_class = BLIP2CaptionerConfig

    def __init__(self, config: RunConfig) -> None:
        super().__init__()
        m = config.method
        stored, tensors = _stage1_run(m.qformer.init)
        check_same_image_tower(config, stored, m.qformer.init)
        self.encoder = self.build_encoder(config)
        self.encoder.load_state_dict({k[len("encoder."):]: v for k, v in tensors.items() if k.startswith("encoder.")})
        self.encoder.requires_grad_(False)
        q = BLIP2QFormerConfig.model_validate({k: v for k, v in stored["method"].items() if k in BLIP2QFormerConfig.model_fields})
        emb = tensors["qformer.token_embed.weight"]
        self.qformer = build_qformer(q, image_token_width(self.encoder), emb.shape[0], tensors["qformer.pos_embed"].shape[1])
        self.qformer.load_state_dict({k[len("qformer."):]: v for k, v in tensors.items() if k.startswith("qformer.")})
        for p in self.qformer.text_parameters():  # stage 2 reads the queries alone: the text path keeps stage 1's weights
            p.requires_grad_(False)
        if m.lm.tune:
            raise ConfigError("method 'blip2' keeps the LM frozen (BLIP-2, Sec. 3.3): method.lm.tune must be false")
        self.language_model = open_caption_lm(config)
        self.freeze_lm()
        self.prefix_length = q.queries
        self.set_max_tokens(config)
        self.query_projection = nn.Linear(q.dim, self.language_model.dim)
        self.train()

    def train(self, mode: bool = True) -> "BLIP2Captioner":
        _FrozenImageTower.train(self, mode)
        if not getattr(self, "tune_lm", True):
            self.language_model.eval()
        return self

    def prefix(self, images: torch.Tensor) -> torch.Tensor:
        """The Q soft-prompt embeddings (B, Q, D) of images: the queries alone over the frozen image tokens."""
        queries, _ = self.qformer(self.image_tokens(images), None)
        return self.query_projection(queries)

