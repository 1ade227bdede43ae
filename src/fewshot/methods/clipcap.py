"""ClipCap (Mokady et al. 2021, "ClipCap: CLIP Prefix for Image Captioning"): a mapper from a frozen image
embedding to k prefix embeddings of a causal LM, trained with the LM's captioning cross-entropy.

Image: the encoder of ``method.image.init`` (a fewshot run folder: a ``clip`` run's image tower, or any image
run), frozen (no gradient, eval mode, bit-identical after training); e = its r, then the run's own image
projection when it has one (CLIP's joint embedding, which ClipCap reads). LM: ``method.lm.init`` — a fewshot
``gpt`` run, a Hugging Face causal LM folder, or ``smollm2`` — through the link of
:mod:`fewshot.models.prefix_lm`; frozen (the paper's transformer-mapper setting) unless ``method.lm.tune``
(the paper's MLP setting tunes GPT-2). Mappers, with D the LM's embedding width:

* ``mlp``: prefix = reshape_k(W₂ tanh(W₁ e)), W₁: e → kD/2, W₂: kD/2 → kD (the paper's code: one hidden
  layer of half the output width, tanh).
* ``transformer``: m = reshape_m(W e) (m mapped tokens) and k learned constant tokens C ~ N(0, 1) go through
  a bidirectional transformer (``mapper_depth`` blocks of ``mapper_heads`` heads, MLP ratio 2, no final
  norm, as the paper's code); the prefix is the outputs at the k constant positions.

Loss (:func:`fewshot.objectives.captioning.caption_loss`): the sequence is the LM's start ids, the prefix,
the caption's tokens and an appended EOS; cross-entropy on the caption tokens and EOS only (prefix and
padding never count). Captions are tokenized with the LM's own tokenizer (:meth:`ClipCap.caption_tokenizer`,
which ``api.pretrain`` hands to the pairs source). Departures for small data and CPUs: k = 10 for both
mappers (the paper: 10 for the MLP, 40 for the transformer), LM widths of fewshot's GPT (128, not 768).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from fewshot.config import MethodConfig, RunConfig
from fewshot.data.token_ids import PAD_ID
from fewshot.data.types import Batch
from fewshot.errors import CheckpointError, ConfigError
from fewshot.io import CHECKPOINT_FORMAT, CHECKPOINT_FORMAT_VERSION, read_file_pair
from fewshot.methods.base import Method
from fewshot.methods.vision_language import check_same_image_tower
from fewshot.models.prefix_lm import PrefixLM, beam_search, greedy, nucleus, open_prefix_lm
from fewshot.models.transformer import TokenTrunk
from fewshot.objectives.captioning import append_eos, caption_labels, caption_loss

__all__ = ["ClipCap", "ClipCapConfig", "MLPMapper", "TransformerMapper"]

DECODINGS = ("greedy", "beam", "nucleus")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ClipCapImage(_Section):
    init: str | None = Field(None, description="a fewshot run folder whose frozen image tower (and CLIP image projection) gives e")


class ClipCapLM(_Section):
    init: str | None = Field(None, description="the causal LM: a fewshot gpt run folder, a Hugging Face causal LM folder, or smollm2")
    tune: bool = Field(False, description="tune the LM with the mapper (the paper's MLP setting); false: frozen, bit-identical")


class ClipCapConfig(MethodConfig):
    mapper: Literal["mlp", "transformer"] = Field("mlp", description="mlp (tanh, one hidden layer) or transformer (learned constants)")
    prefix_length: int = Field(10, ge=1, description="k prefix embeddings (Mokady et al. 2021: 10 for the MLP, 40 for the transformer)")
    mapped_tokens: int | None = Field(None, ge=1, description="transformer: tokens e is mapped to before the constants attend (null = k)")
    mapper_depth: int = Field(8, ge=1, description="transformer mapper blocks (paper: 8)")
    mapper_heads: int = Field(8, ge=1, description="transformer mapper heads, dividing the LM's width (paper: 8)")
    image: ClipCapImage = Field(default_factory=ClipCapImage)
    lm: ClipCapLM = Field(default_factory=ClipCapLM)


class MLPMapper(nn.Module):
    """e (B, E) → prefix (B, k, D) = reshape_k(W₂ tanh(W₁ e)), hidden width kD/2."""

    def __init__(self, embed_dim: int, dim: int, k: int) -> None:
        super().__init__()
        self.k = k
        self.net = nn.Sequential(nn.Linear(embed_dim, k * dim // 2), nn.Tanh(), nn.Linear(k * dim // 2, k * dim))

    def forward(self, e: torch.Tensor) -> torch.Tensor:
        return self.net(e).view(e.shape[0], self.k, -1)


class TransformerMapper(nn.Module):
    """e (B, E) → m mapped tokens reshape_m(W e), then [mapped ⊕ k constants] through a bidirectional trunk;
    the prefix (B, k, D) is the outputs at the constants' positions."""

    def __init__(self, embed_dim: int, dim: int, k: int, mapped: int, depth: int, heads: int) -> None:
        super().__init__()
        self.mapped = mapped
        self.linear = nn.Linear(embed_dim, mapped * dim)
        self.constants = nn.Parameter(torch.randn(k, dim))
        self.trunk = TokenTrunk(dim, depth, heads, mlp_ratio=2.0, causal=False)
        self.trunk.norm = nn.Identity()  # the paper's mapper has no final norm: the prefix keeps its own scale

    def forward(self, e: torch.Tensor) -> torch.Tensor:
        x = self.linear(e).view(e.shape[0], self.mapped, -1)
        x = torch.cat([x, self.constants.expand(e.shape[0], -1, -1)], dim=1)
        return self.trunk(x)[:, self.mapped :]


def _image_tower_weights(path: str) -> tuple[dict[str, Any], dict[str, torch.Tensor], torch.Tensor | None]:
    """(stored config, encoder weights, image projection weight or None) of a run folder or checkpoint, hash checked."""
    file = Path(path) / "checkpoints" / "last.safetensors" if Path(path).is_dir() else Path(path)
    meta, tensors = read_file_pair(file, CHECKPOINT_FORMAT, CHECKPOINT_FORMAT_VERSION, "checkpoint")
    if "config" not in meta:
        raise CheckpointError(f"'{path}' is not a fewshot run: its checkpoint has no config")
    prefix = "model.encoder."
    encoder = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
    return meta["config"], encoder, tensors.get("model.image_projection.weight")


class ClipCap(Method):
    """Frozen image embedding → mapper → k prefix embeddings → the causal LM's caption cross-entropy."""

    config_class = ClipCapConfig
    inputs = ("images", "tokens")

    @classmethod
    def caption_tokenizer(cls, config: RunConfig) -> Any:
        """The LM's tokenizer (a ``tokenizers.Tokenizer``): what the run's captions are tokenized with."""
        return _open_lm(config).tokenizer

    def __init__(self, config: RunConfig) -> None:
        super().__init__()
        m = config.method
        if m.image.init is None:
            raise ConfigError("method 'clipcap' maps a frozen image embedding: set method.image.init=RUN_DIR (e.g. a clip-scenes run)")
        self.encoder = self.build_encoder(config)
        self.image_projection = self._load_image_tower(config, m.image.init)
        self.encoder.requires_grad_(False)
        self.language_model = _open_lm(config)
        link = self.language_model
        if not m.lm.tune:
            link.model.requires_grad_(False)
        self.tune_lm = m.lm.tune
        seq_len = getattr(config.data, "seq_len", None)
        if seq_len is not None:
            link.check_fits(m.prefix_length, seq_len + 1)  # caption ⊕ EOS
        self.max_tokens = (seq_len or link.context - len(link.start_ids) - m.prefix_length) + 1
        embed_dim = self.encoder.dim if self.image_projection is None else self.image_projection.out_features
        if m.mapper == "mlp":
            self.mapper: nn.Module = MLPMapper(embed_dim, link.dim, m.prefix_length)
        else:
            if link.dim % m.mapper_heads:
                raise ConfigError(f"method.mapper_heads={m.mapper_heads} must divide the LM's width {link.dim}")
            self.mapper = TransformerMapper(embed_dim, link.dim, m.prefix_length, m.mapped_tokens or m.prefix_length,
                                            m.mapper_depth, m.mapper_heads)
        self.prefix_length = m.prefix_length
        self._register_state_dict_hook(_untie)
        self.train()

    def _load_image_tower(self, config: RunConfig, path: str) -> nn.Linear | None:
        theirs, state, projection = _image_tower_weights(path)
        check_same_image_tower(config, theirs, path)
        self.encoder.load_state_dict(state)
        if projection is None:
            return None
        linear = nn.Linear(projection.shape[1], projection.shape[0], bias=False)
        linear.weight.data.copy_(projection)
        return linear.requires_grad_(False)

    def train(self, mode: bool = True) -> "ClipCap":
        super().train(mode)
        self.encoder.eval()  # frozen: BatchNorm statistics stay as loaded
        if not getattr(self, "tune_lm", True):
            self.language_model.eval()
        return self

    # ------------------------------------------------------------------ the parts

    def image_embedding(self, images: torch.Tensor) -> torch.Tensor:
        """The frozen e (B, E): the image tower's r, then the init run's image projection when it has one."""
        with torch.no_grad():
            e = self.encoder(images)
            return e if self.image_projection is None else self.image_projection(e)

    def prefix(self, images: torch.Tensor) -> torch.Tensor:
        """The k prefix embeddings (B, k, D) of images."""
        return self.mapper(self.image_embedding(images))

    def caption_logits(self, prefix: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Logits (B, s + k + L, V) at every position of start ids ⊕ prefix ⊕ ``ids`` (B, L)."""
        sequence = torch.cat([self.language_model.prefix_sequence(prefix), self.language_model.embed(ids).to(prefix.dtype)], dim=1)
        return self.language_model.step(sequence)[0]

    # ------------------------------------------------------------------ the step

    def forward(self, batch: Batch, generator: torch.Generator) -> tuple[torch.Tensor, dict[str, float]]:
        link = self.language_model
        prefix = self.prefix(batch["images"])
        ids = append_eos(batch["tokens"], link.eos_id, PAD_ID)
        logits = self.caption_logits(prefix, ids)
        return caption_loss(logits, caption_labels(len(link.start_ids) + self.prefix_length, ids, PAD_ID)), {}

    # ------------------------------------------------------------------ captioning

    @torch.no_grad()
    def caption_images(self, images: torch.Tensor, decoding: str = "greedy", max_tokens: int | None = None, beams: int = 5,
                       top_p: float = 0.9, temperature: float = 1.0, generator: torch.Generator | None = None) -> list[str]:
        """Captions of images (B, C, H, W) in [0, 1]: ``greedy``, ``beam`` (``beams`` wide) or ``nucleus`` (``top_p``)."""
        if decoding not in DECODINGS:
            raise ConfigError(f"unknown decoding '{decoding}'; choose {', '.join(DECODINGS)}")
        was = self.training
        self.eval()
        prefix, n = self.prefix(images), max_tokens or self.max_tokens
        link = self.language_model
        if decoding == "greedy":
            ids = greedy(link, prefix, n)
        elif decoding == "beam":
            ids = beam_search(link, prefix, n, beams)
        else:
            ids = nucleus(link, prefix, n, top_p, temperature, generator)
        self.train(was)
        return [link.decode(row).strip() for row in ids]

    @property
    def text_tokenizer(self) -> Any:
        """The LM's tokenizer: the run's captions are its ids (as a pre-trained text tower's in CLIP)."""
        return self.language_model.tokenizer


def _untie(module: nn.Module, state: dict[str, torch.Tensor], prefix: str, local_metadata: Any) -> None:
    """A tensor stored under two names (a Hugging Face LM's tied input and output embeddings) is saved as two copies:
    safetensors refuses shared storage, and loading writes the same values into the one tied parameter."""
    seen: set[int] = set()
    for key, value in state.items():
        if value.untyped_storage().data_ptr() in seen:
            state[key] = value.clone()
        else:
            seen.add(value.untyped_storage().data_ptr())


def _open_lm(config: RunConfig) -> PrefixLM:
    m = config.method
    if m.lm.init is None:
        raise ConfigError("method 'clipcap' needs a causal LM: set method.lm.init to a gpt run folder, a Hugging Face "
                          "causal LM folder or smollm2")
    link = open_prefix_lm(m.lm.init)
    if link.eos_id == PAD_ID:
        raise ConfigError(f"{link.name}'s EOS is id {PAD_ID}, the id caption pairs pad with: the end of a caption would read as padding")
    pad = link.tokenizer.get_added_tokens_decoder().get(PAD_ID)
    if pad is None or not pad.special:  # captions are padded with id 0: it must never be a word of a caption
        raise ConfigError(f"{link.name}'s tokenizer has a text token at id {PAD_ID}, the id caption pairs pad with; "
                          "use an LM whose id 0 is a special token (fewshot's gpt runs, SmolLM2)")
    return link
