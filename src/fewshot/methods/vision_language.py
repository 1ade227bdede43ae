"""CLIP (Radford et al. 2021): an image tower and a text tower trained to agree on image–caption pairs.

Image tower: any registered encoder (``encoder.name``), r = encoder(images). Text tower: the
registered ``text-transformer`` (bidirectional, [CLS] first, padding masked), r = the [CLS] state.
Each tower gets a linear projection (no bias, as CLIP's) to ``method.embed_dim``; the loss is
:func:`fewshot.objectives.clip.clip_loss` with a learned logit scale, initialised at ln(1/τ₀),
τ₀ = 0.07, and clamped at ln 100 after every step (open_clip clamps the parameter the same way).

Lock flags give LiT's grid (Zhai et al. 2022): ``method.image.lock`` freezes the image tower —
no gradient, kept in eval mode so BatchNorm statistics do not move either, bit-identical after
training — and needs pretrained weights, ``method.image.init=RUN`` (a fewshot run folder whose
encoder is this run's ``encoder``). The projections stay trainable (they are new). A locked
tower's outputs depend only on its input, so they are cached by the input's bytes
(``method.cache_locked``): a pair seen again skips the tower. ``method.text.lock`` needs a
pretrained text tower: ``method.text.name=all-minilm-l6-v2`` (the real sentence-transformers model,
loaded offline with its hash checked; captions are then its word pieces, ``text_tokenizer``, and it
reads [CLS] caption [SEP] with its own mean pooling), locked (LiT's uL) or tuned (U).

Departures from the paper, for small data and CPUs: ``embed_dim`` 128 (CLIP: 512 for ViT-B/32);
the text tower is bidirectional and reads [CLS] (CLIP's is causal and reads [EOS]); no image
augmentation (CLIP's is a random square crop only; scene captions name positions, which crops
and flips would falsify); the one trainer's AdamW decays the logit scale with the weights
(open_clip exempts it), by lr·weight_decay·t per step, 5·10⁻⁷ at this project's defaults.

CoCa (Yu et al. 2022, :class:`CoCa`, ``method=coca``) is CLIP's towers, projections, lock flags and
loss plus an attentional pooler over the image tokens and a captioning decoder.

Batch keys (the image–text pairs contract): ``images`` (B, C, H, W) in [0, 1], ``tokens`` (B, T)
padded with PAD_ID, ``caption_keys`` (B,) equal exactly where two captions are identical, so an
identical caption of another image is a positive (``method.caption_positives``).
"""

from __future__ import annotations

import hashlib
import math
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from fewshot.config import MethodConfig, RunConfig
from fewshot.data.token_ids import CLS_ID, EOS_ID, IGNORE_INDEX, PAD_ID
from fewshot.data.types import Batch
from fewshot.distributed import gather_all, gather_others, world_size
from fewshot.errors import CheckpointError, ConfigError, DataError
from fewshot.io import CHECKPOINT_FORMAT, CHECKPOINT_FORMAT_VERSION, read_file_pair
from fewshot.methods.base import Method
from fewshot.models.encoders import create_encoder
from fewshot.models.hf_text import PRETRAINED, load_pretrained, word_pieces
from fewshot.models.language import TextTransformer, gpt2_init, prepend
from fewshot.models.pooling import AttentionalPooler
from fewshot.models.transformer import TokenTrunk
from fewshot.objectives.captioning import append_eos
from fewshot.objectives.clip import clip_loss
from fewshot.objectives.language import token_cross_entropy

__all__ = ["CLIP", "CLIPConfig", "CoCa", "CoCaConfig", "decode_captions", "pretrained_encoder"]

TEXT_ENCODER = "text-transformer"
TEXT_DEFAULTS = {"dim": 128, "depth": 4, "heads": 4}


class _Tower(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    lock: bool = Field(False, description="freeze the tower (LiT's L): no gradient, eval mode; needs pretrained weights")


class ImageTowerConfig(_Tower):
    init: str | None = Field(None, description="a fewshot run folder whose encoder starts the image tower (LiT's L or U)")


class NamingEpisodesConfig(MethodConfig):
    """What a method trained on interleaved naming episodes adds to its recipe (Frozen, Flamingo):
    :func:`~fewshot.data.vl_prompts.naming_episode`, glossary names only, never the evaluation's."""

    episodes: int = Field(0, ge=0, description="naming episodes added to each training batch (interleaved image-text sequences; 0: captions only)")
    episode_images: int = Field(12, ge=3, description="images at most in one naming episode")
    glossary: int = Field(100, ge=3, description="made-up names the naming episodes draw from (never the evaluation's nonce names)")


class TextTowerConfig(_Tower):
    name: str = Field(TEXT_ENCODER, description="text-transformer (trained from scratch on the run's BPE tokens) or a "
                      "pre-trained Hugging Face encoder: all-minilm-l6-v2 (LiT's L when locked, U when tuned)")
    dim: int | None = Field(None, ge=1, description="text-transformer width (null = 128)")
    depth: int | None = Field(None, ge=1, description="text-transformer blocks (null = 4)")
    heads: int | None = Field(None, ge=1, description="text-transformer attention heads, dividing dim (null = 4)")


class CLIPConfig(MethodConfig):
    temperature: float = Field(0.07, gt=0, description="initial τ; the logit scale ln(1/τ) is learned (Radford et al. 2021: 0.07)")
    max_scale: float = Field(100.0, gt=1, description="the logit scale 1/τ is clamped at this (Radford et al. 2021: 100)")
    embed_dim: int = Field(128, ge=1, description="shared embedding width of the two projections (CLIP ViT-B/32: 512)")
    local_loss: bool = Field(False, description="under DDP: score only this process's pairs against all gathered ones (open_clip's local_loss)")
    gather_negatives: bool = Field(True, description="under DDP: every process's pairs are negatives (the global batch), else local")
    caption_positives: bool = Field(True, description="identical captions in a batch are positives, not negatives (needs caption_keys)")
    cache_locked: bool = Field(True, description="cache a locked tower's outputs by input (LiT precomputes them)")
    image: ImageTowerConfig = Field(default_factory=ImageTowerConfig)
    text: TextTowerConfig = Field(default_factory=TextTowerConfig)


def pretrained_encoder(path: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(stored config, encoder weights) of a fewshot run folder or its checkpoint file, SHA-256 checked.

    What ``Run.open(path).encoder()`` reads, read here because a method sits below train/ and run.py
    in the layers (tests/test_layers.py) and so cannot import them."""
    path = Path(path)
    meta, tensors = read_file_pair(path / "checkpoints" / "last.safetensors" if path.is_dir() else path,
                                   CHECKPOINT_FORMAT, CHECKPOINT_FORMAT_VERSION, "checkpoint")
    if "config" not in meta:
        raise CheckpointError(f"'{path}' is not a fewshot run: its checkpoint has no config")
    prefix = "model.encoder."
    state = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
    return meta["config"], state


def load_image_tower(encoder: nn.Module, config: RunConfig, path: str | Path) -> nn.Module:
    """``encoder`` with the image tower of the run at ``path``, refused (one line) unless that run builds the same
    tower as ``config``; what every method that starts from another run's image encoder calls."""
    theirs, state = pretrained_encoder(path)
    check_same_image_tower(config, theirs, path)
    encoder.load_state_dict(state)
    return encoder


def image_tower(encoder: nn.Module, config: RunConfig, image: ImageTowerConfig) -> nn.Module:
    """``encoder`` as ``method.image`` asks: started from the run ``image.init`` (:func:`load_image_tower`) and, with
    ``image.lock``, frozen (no gradient; the caller keeps it in eval mode). A lock without weights is refused."""
    if image.lock and image.init is None:
        raise ConfigError("method.image.lock=true needs pretrained weights to lock: set method.image.init=RUN_DIR")
    if image.init is not None:
        load_image_tower(encoder, config, image.init)
    return encoder.requires_grad_(False) if image.lock else encoder


def check_same_image_tower(config: RunConfig, theirs: dict[str, Any], path: str | Path) -> None:
    """A one-line ConfigError unless the run config ``theirs`` (of the run at ``path``) builds the image encoder
    ``config`` builds: the same encoder name and options on images of the same channels and size."""
    ours = config.model_dump(mode="json")
    mine = (ours["encoder"]["name"], ours["encoder"]["options"], ours["data"]["channels"], ours["data"]["image_size"])
    found = (theirs["encoder"]["name"], theirs["encoder"]["options"], theirs["data"]["channels"], theirs["data"]["image_size"])
    if found != mine:
        raise ConfigError(
            f"method.image.init '{path}' has encoder {found[0]} {found[1]} on {found[2]}×{found[3]} px images; "
            f"this run builds {mine[0]} {mine[1]} on {mine[2]}×{mine[3]} px: set encoder and data to match"
        )


def with_cls_sep(tokens: torch.Tensor, cls_id: int, sep_id: int, max_length: int) -> torch.Tensor:
    """BERT's input from plain caption ids (B, T) right-padded with PAD_ID: [CLS] caption [SEP] padding, (B, T + 2)."""
    if tokens.shape[1] + 2 > max_length:
        raise DataError(f"captions of {tokens.shape[1]} word pieces exceed the text tower's {max_length} with [CLS] and [SEP]: truncate them")
    b, t = tokens.shape
    out = torch.full((b, t + 2), PAD_ID, dtype=tokens.dtype, device=tokens.device)
    out[:, 0], out[:, 1 : t + 1] = cls_id, tokens
    out[torch.arange(b, device=tokens.device), 1 + (tokens != PAD_ID).sum(dim=1)] = sep_id
    return out


def _row_key(row: torch.Tensor) -> bytes:
    """A cache key for one input row (a CPU tensor): a hash of its bytes."""
    return hashlib.blake2b(row.contiguous().numpy().tobytes(), digest_size=16).digest()


class CLIP(Method):
    """Image tower + text tower → linear projections → symmetric InfoNCE with a learned scale."""

    config_class = CLIPConfig
    inputs = ("images", "tokens", "caption_keys")

    @classmethod
    def build_encoder(cls, config: RunConfig) -> nn.Module:
        """The image tower alone (what the episode evaluator scores), without its ``image.init`` weights."""
        return super().build_encoder(config)

    text_causal, text_specials = False, 1  # the text-transformer's attention, and its positions beyond the caption ([CLS])

    @classmethod
    def build_text_encoder(cls, config: RunConfig) -> nn.Module:
        """The text tower: a text-transformer sized by ``method.text`` and ``data``, or a pre-trained
        Hugging Face encoder (:mod:`fewshot.models.hf_text`; its captions are its own word pieces)."""
        t, data = config.method.text, config.data
        if t.name != TEXT_ENCODER:
            if t.name not in PRETRAINED:
                raise ConfigError(f"unknown method.text.name '{t.name}'; choose {TEXT_ENCODER} or one of: {', '.join(PRETRAINED)}")
            sized = [k for k in TEXT_DEFAULTS if getattr(t, k) is not None]
            if sized:
                raise ConfigError(f"method.text.{sized[0]} sizes a {TEXT_ENCODER}; {t.name} has its own size")
            tower = load_pretrained(t.name)
            if tower.pad_id != PAD_ID:  # the pairs pad captions with fewshot's id
                raise ConfigError(f"{t.name} pads with id {tower.pad_id}, the caption pairs with {PAD_ID}")
            return tower
        sizes = {k: getattr(t, k) or v for k, v in TEXT_DEFAULTS.items()}
        vocab_size, seq_len = getattr(data, "vocab_size", None), getattr(data, "seq_len", None)
        if vocab_size is None or seq_len is None:
            raise ConfigError(f"method '{config.method.name}' sizes its text tower by data.vocab_size and data.seq_len, which "
                              f"data.source={data.source} does not have: pre-train on image–caption pairs")
        try:  # + the [CLS] before the caption's tokens (CoCa: [BOS] before, [CLS] after)
            return create_encoder(TEXT_ENCODER, vocab_size=vocab_size, max_len=seq_len + cls.text_specials, causal=cls.text_causal, **sizes)
        except (ConfigError, ValueError) as exc:  # dim % heads
            raise ConfigError(f"method.text {sizes}: {exc}") from None

    def __init__(self, config: RunConfig) -> None:
        super().__init__()
        m = config.method
        if m.text.lock and m.text.name == TEXT_ENCODER:
            raise ConfigError(f"method.text.lock=true: the {TEXT_ENCODER} is trained from scratch, so there are no pretrained "
                              f"weights to lock; lock a pre-trained one (method.text.name={', '.join(PRETRAINED)})")
        if m.image.lock and m.image.init is None:
            raise ConfigError("method.image.lock=true needs pretrained weights to lock: set method.image.init=RUN_DIR "
                              "(a locked tower from scratch would stay random)")
        self.encoder = self.build_encoder(config)
        if m.image.init is not None:
            self._load_image_tower(config, m.image.init)
        self.text_encoder = self.build_text_encoder(config)
        self.image_projection = nn.Linear(self.encoder.dim, m.embed_dim, bias=False)
        self.text_projection = nn.Linear(self.text_encoder.dim, m.embed_dim, bias=False)
        nn.init.normal_(self.image_projection.weight, std=self.encoder.dim**-0.5)  # CLIP's width^-0.5
        nn.init.normal_(self.text_projection.weight, std=self.text_encoder.dim**-0.5)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / m.temperature)))
        self.max_logit_scale = math.log(m.max_scale)
        self.locked = {"image": m.image.lock, "text": m.text.lock}
        for name, tower in (("image", self.encoder), ("text", self.text_encoder)):
            if self.locked[name]:
                tower.requires_grad_(False)
                tower.eval()
        self.cache_locked, self._cache = m.cache_locked, {"image": {}, "text": {}}
        self.local_loss, self.gather_negatives, self.caption_positives = m.local_loss, m.gather_negatives, m.caption_positives
        self.channels_last = config.train.channels_last

    def _load_image_tower(self, config: RunConfig, path: str) -> None:
        theirs, state = pretrained_encoder(path)
        check_same_image_tower(config, theirs, path)
        self.encoder.load_state_dict(state)

    def train(self, mode: bool = True) -> "CLIP":
        super().train(mode)
        for name, tower in (("image", self.encoder), ("text", self.text_encoder)):
            if self.locked[name]:
                tower.eval()  # a locked tower's BatchNorm statistics stay as loaded
        return self

    # ------------------------------------------------------------------ the towers

    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        """The image tower's r, (B, encoder.dim)."""
        if self.channels_last and images.ndim == 4:
            images = images.contiguous(memory_format=torch.channels_last)
        return self.encoder(images)

    @property
    def text_tokenizer(self) -> Any:
        """A pre-trained text tower's own tokenizer (a ``tokenizers.Tokenizer``) for the captions'
        ``tokens``; None for the text-transformer, which reads the run's BPE ids."""
        tower = self.text_encoder
        return None if isinstance(tower, TextTransformer) else word_pieces(tower.tokenizer)

    def text_features(self, tokens: torch.Tensor) -> torch.Tensor:
        """The text tower's r for PAD-padded captions (B, T), (B, dim): the text-transformer's [CLS] state
        with padding masked, or a pre-trained tower's own pooling of [CLS] caption [SEP]."""
        tower = self.text_encoder
        if not isinstance(tower, TextTransformer):
            return tower(with_cls_sep(tokens, tower.tokenizer.cls_token_id, tower.tokenizer.sep_token_id, tower.max_length))
        if tokens.shape[1] >= tower.max_len:
            raise DataError(f"captions of {tokens.shape[1]} tokens exceed the text tower's context of {tower.max_len - 1} "
                            "(data.seq_len): truncate them")
        sequence = prepend(tokens, tower.start_id)
        padding = sequence == PAD_ID
        return tower.hidden(sequence, padding_mask=padding if bool(padding.any()) else None)[:, 0]

    def _tower(self, name: str, features, x: torch.Tensor) -> torch.Tensor:
        """``features(x)``; for a locked tower without gradient, from the cache where the input was seen."""
        if not self.locked[name]:
            return features(x)
        with torch.no_grad():
            if not self.cache_locked:
                return features(x)
            cache = self._cache[name]
            keys = [_row_key(row) for row in x.detach().cpu()]  # one copy to the host, not one per row
            missing = [i for i, k in enumerate(keys) if k not in cache]
            if missing:
                fresh = features(x[missing])
                for i, row in zip(missing, fresh):
                    cache[keys[i]] = row
            return torch.stack([cache[k] for k in keys])

    def embed_images(self, images: torch.Tensor) -> torch.Tensor:
        """Projected image embeddings (B, embed_dim), not normalised."""
        return self.image_projection(self._tower("image", self.image_features, images))

    def embed_texts(self, tokens: torch.Tensor) -> torch.Tensor:
        """Projected text embeddings (B, embed_dim) of PAD-padded token ids, not normalised."""
        return self.text_projection(self._tower("text", self.text_features, tokens))

    # ------------------------------------------------------------------ the step

    def loss(self, image: torch.Tensor, text: torch.Tensor, caption_keys: torch.Tensor | None) -> torch.Tensor:
        """:func:`clip_loss` on this process's embeddings, with every process's as columns under DDP."""
        keys = caption_keys if self.caption_positives else None
        others: dict[str, torch.Tensor | None] = {}
        if self.gather_negatives and world_size() > 1:
            gathered = gather_others(image, text)  # other ranks' images, then their texts, with gradient
            others["other_images"], others["other_texts"] = gathered.chunk(2)
            if keys is not None:
                n, rank = keys.shape[0], torch.distributed.get_rank()
                every = gather_all(keys)
                others["other_keys"] = torch.cat([every[:rank * n], every[(rank + 1) * n:]])
        return clip_loss(image, text, self.logit_scale, keys, **others, local_loss=self.local_loss,
                         max_logit_scale=self.max_logit_scale)

    def forward(self, batch: Batch, generator: torch.Generator) -> tuple[torch.Tensor, dict[str, float]]:
        image = self.embed_images(batch["images"]).float()
        text = self.embed_texts(batch["tokens"]).float()
        scale = math.exp(min(self.logit_scale.item(), self.max_logit_scale))  # s = 1/τ, logged to watch it learn
        return self.loss(image, text, batch.get("caption_keys")), {"scale": scale}

    @torch.no_grad()
    def after_step(self, step: int, total_steps: int) -> None:
        self.logit_scale.clamp_(0, self.max_logit_scale)  # as open_clip after each optimizer step


# ---------------------------------------------------------------------------------------------- CoCa

class CoCaConfig(CLIPConfig):
    contrastive_loss_weight: float = Field(1.0, ge=0, description="λ_Con (Yu et al. 2022; open_clip's clip_loss_weight: 1)")
    caption_loss_weight: float = Field(2.0, ge=0, description="λ_Cap (Yu et al. 2022; open_clip's caption_loss_weight: 2)")
    caption_queries: int = Field(256, ge=1, description="attentional-pooler queries the multimodal layers attend to (paper: 256)")
    pool_heads: int = Field(8, ge=1, description="attention heads of the attentional pooler, dividing method.text.dim (open_clip: 8)")
    multimodal_depth: int | None = Field(None, ge=1, description="multimodal (cross-attending) decoder blocks; null = as many as the "
                                         "unimodal text blocks (the paper splits its decoder in halves)")
    eos: bool = Field(False, description="also predict [EOS] after each caption's last token, so captions can be decoded "
                      "(open_clip's CoCa appends an end token; off: the pilot runs' loss, captions never end)")


class CoCa(CLIP):
    """CoCa (Yu et al. 2022, "CoCa: Contrastive Captioners are Image-Text Foundation Models"): CLIP's
    towers, projections, lock flags and loss, plus a captioning decoder on the image tokens.

    Image: the image tower's tokens (``forward_tokens``; conv4's grid cells, its map before flattening)
    → an attentional pooler (:class:`fewshot.models.pooling.AttentionalPooler`, width ``method.text.dim``)
    with 1 + ``caption_queries`` queries: the first is the contrastive image embedding (→ the image
    projection), the rest are what the multimodal layers cross-attend. Text: unimodal causal layers
    (the text-transformer, ``causal``) read [BOS] caption [CLS]; the [CLS] appended after the caption's
    last token (before its padding) has seen the whole caption and is the text embedding (→ the text
    projection). Multimodal layers (causal self-attention + cross-attention to the pooled image tokens,
    the shared trunk built with ``context_dim``) continue the unimodal states of [BOS] caption and an LM
    head predicts caption token t from position t − 1 (positions ≤ t − 1 and the image only):

        L = λ_Con · clip_loss(image, text) + λ_Cap · (−(1/|M|) Σ_{(b,t) ∈ M} log p(y_bt | y_b,<t, image))

    M = the caption's tokens, padding ignored (IGNORE_INDEX); λ_Con = 1, λ_Cap = 2 (open_clip's CoCa).
    With ``method.eos`` the decoder also reads the caption's last token and predicts [EOS] there (M then holds the
    caption's tokens and its [EOS]), which :meth:`CoCa.caption_ids` needs to stop. Departures: without ``eos`` no
    [EOS] is predicted (the pairs carry none: a caption ends at its padding); the pooler
    is one module for both uses as open_clip's (the paper draws two); conv4's 2×2 map at 32 px gives only
    4 image tokens (a ViT gives 1 + patches).
    """

    config_class = CoCaConfig
    text_causal, text_specials = True, 2  # [BOS] before the caption, [CLS] after it

    def __init__(self, config: RunConfig) -> None:
        m = config.method
        if m.text.name != TEXT_ENCODER:
            raise ConfigError(f"method 'coca' needs its text tower's states for the decoder: method.text.name={TEXT_ENCODER}, not {m.text.name}")
        super().__init__(config)
        if hasattr(self.encoder, "forward_tokens"):
            token_dim = self.encoder.dim
        elif hasattr(self.encoder, "grid") and hasattr(self.encoder, "features"):
            token_dim = self.encoder.grid[0]
        else:
            raise ConfigError(f"method 'coca' pools the image tower's tokens: encoder '{config.encoder.name}' gives none; "
                              "use vit-tiny or conv4")
        dim = self.text_encoder.dim
        if dim % m.pool_heads:
            raise ConfigError(f"method.pool_heads={m.pool_heads} must divide method.text.dim={dim}")
        self.pooler = AttentionalPooler(dim, token_dim, 1 + m.caption_queries, m.pool_heads)
        self.image_projection = nn.Linear(dim, m.embed_dim, bias=False)
        nn.init.normal_(self.image_projection.weight, std=dim**-0.5)
        heads = self.text_encoder.trunk.blocks[0].attn.heads
        self.decoder = TokenTrunk(dim, m.multimodal_depth or len(self.text_encoder.trunk.blocks), heads, causal=True, context_dim=dim)
        self.lm_head = nn.Linear(dim, self.text_encoder.vocab_size)
        self.decoder.apply(gpt2_init)
        self.lm_head.apply(gpt2_init)
        self.weights = (m.contrastive_loss_weight, m.caption_loss_weight)
        self.eos = m.eos
        self.max_caption = self.text_encoder.max_len - 2

    # ------------------------------------------------------------------ the towers

    def image_tokens(self, images: torch.Tensor) -> torch.Tensor:
        """The image tower's tokens (B, L, width): a token tower's ``forward_tokens``, or conv4's grid cells."""
        if self.channels_last and images.ndim == 4:
            images = images.contiguous(memory_format=torch.channels_last)
        if hasattr(self.encoder, "forward_tokens"):
            return self.encoder.forward_tokens(images)
        return self.encoder.features(images).flatten(2).transpose(1, 2)

    def pooled_images(self, images: torch.Tensor) -> torch.Tensor:
        """The attentional pooler's outputs (B, 1 + caption_queries, dim): the contrastive query first."""
        return self.pooler(self._tower("image", self.image_tokens, images))

    def unimodal(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Causal text states of [BOS] caption [CLS] padding for right-padded captions (B, T), as the pairs give them:
        (states (B, T + 2, dim), the [CLS] position of each row (B,), the sequence's ids (B, T + 2))."""
        tower = self.text_encoder
        b, t = tokens.shape
        if t + 2 > tower.max_len:
            raise DataError(f"captions of {t} tokens exceed the text tower's context of {tower.max_len - 2} (data.seq_len): truncate them")
        cls_at = 1 + (tokens != PAD_ID).sum(dim=1)
        sequence = torch.full((b, t + 2), PAD_ID, dtype=tokens.dtype, device=tokens.device)
        sequence[:, 0], sequence[:, 1 : t + 1] = tower.start_id, tokens
        sequence[torch.arange(b, device=tokens.device), cls_at] = CLS_ID
        padding = sequence == PAD_ID
        return tower.hidden(sequence, padding_mask=padding if bool(padding.any()) else None), cls_at, sequence

    def text_features(self, tokens: torch.Tensor) -> torch.Tensor:
        """The unimodal layers' [CLS] state (B, dim), appended after each caption."""
        states, cls_at, _ = self.unimodal(tokens)
        return states[torch.arange(len(tokens), device=tokens.device), cls_at]

    def embed_images(self, images: torch.Tensor) -> torch.Tensor:
        """Projected contrastive image embeddings (B, embed_dim): the pooler's first query."""
        return self.image_projection(self.pooled_images(images)[:, 0])

    def caption_logits(self, states: torch.Tensor, sequence: torch.Tensor, image_tokens: torch.Tensor, positions: int | None = None) -> torch.Tensor:
        """Next-token logits (B, P, vocab) at positions 0..P−1 ([BOS] caption; P = T unless given, T + 1 with [EOS])
        from the unimodal states (B, T + 2, dim) of ``sequence``, the multimodal layers attending the pooled ``image_tokens``."""
        t = states.shape[1] - 2 if positions is None else positions
        keys_off = (sequence[:, :t] == PAD_ID) | (sequence[:, :t] == CLS_ID)  # [CLS] only sits where no target is
        hidden = self.decoder(states[:, :t], padding_mask=keys_off if bool(keys_off.any()) else None, context=image_tokens)
        return self.lm_head(hidden)

    # ------------------------------------------------------------------ the step

    def forward(self, batch: Batch, generator: torch.Generator) -> tuple[torch.Tensor, dict[str, float]]:
        tokens = batch["tokens"]
        pooled = self.pooled_images(batch["images"])
        states, cls_at, sequence = self.unimodal(tokens)
        image = self.image_projection(pooled[:, 0]).float()
        text = self.text_projection(states[torch.arange(len(tokens), device=tokens.device), cls_at]).float()
        contrastive = self.loss(image, text, batch.get("caption_keys"))
        targets = append_eos(tokens, EOS_ID, PAD_ID) if self.eos else tokens
        logits = self.caption_logits(states, sequence, pooled[:, 1:], targets.shape[1])
        caption = token_cross_entropy(logits, targets.masked_fill(targets == PAD_ID, IGNORE_INDEX))
        scale = math.exp(min(self.logit_scale.item(), self.max_logit_scale))
        loss = self.weights[0] * contrastive + self.weights[1] * caption
        return loss, {"scale": scale, "contrastive": contrastive.item(), "caption": caption.item()}

    # ------------------------------------------------------------------ captioning

    @torch.no_grad()
    def caption_ids(self, images: torch.Tensor, decoding: str = "greedy", max_tokens: int | None = None, top_p: float = 0.9,
                    generator: torch.Generator | None = None, **_: Any) -> list[list[int]]:
        """Caption ids of images (B, C, H, W), each cut before its [EOS]: ``greedy`` or ``nucleus`` (``top_p``), recomputing
        the short caption at every step. Refused for a run trained without ``method.eos`` (its captions never end)."""
        if not self.eos:
            raise ConfigError("this coca run was trained without method.eos=true, so its decoder never learned where a caption ends; "
                              "train with method.eos=true to caption with it")
        was = self.training
        self.eval()
        pooled = self.pooled_images(images)[:, 1:]

        def next_logits(ids: torch.Tensor) -> torch.Tensor:
            states, _, sequence = self.unimodal(ids)
            return self.caption_logits(states, sequence, pooled, ids.shape[1] + 1)[:, -1]

        out = decode_captions(next_logits, images.shape[0], min(max_tokens or self.max_caption, self.max_caption), decoding,
                              EOS_ID, top_p, generator, images.device)
        self.train(was)
        return out


def decode_captions(next_logits, batch: int, max_tokens: int, decoding: str, eos_id: int, top_p: float = 0.9,
                    generator: torch.Generator | None = None, device: torch.device | str = "cpu") -> list[list[int]]:
    """Rows of caption ids, each cut before its first ``eos_id``, by :func:`~fewshot.models.prefix_lm.decode_steps`:
    ``next_logits(ids (B, k) PAD-padded) → (B, V)`` is the next token's logits after each row's k ids, recomputed from
    the start at every step (captions are a few tokens); ``greedy`` takes the argmax, ``nucleus`` draws from the
    top-``top_p`` nucleus (Holtzman et al. 2020). A finished row is fed PAD from its [EOS] on."""
    from fewshot.models.prefix_lm import decode_steps, greedy_choice, nucleus_choice

    if decoding not in ("greedy", "nucleus"):
        raise ConfigError(f"unknown decoding '{decoding}' for this captioner; choose greedy or nucleus")

    def padded_after_eos(tokens: torch.Tensor) -> torch.Tensor:
        finished = (tokens == eos_id).long().cumsum(dim=1) > 0
        return next_logits(tokens.masked_fill(finished, PAD_ID)).float()

    choose = greedy_choice if decoding == "greedy" else nucleus_choice(top_p, 1.0, generator)
    return decode_steps(padded_after_eos, batch, max_tokens, eos_id, choose, device)
