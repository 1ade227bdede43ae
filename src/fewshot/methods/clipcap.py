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
from fewshot.errors import CheckpointError, ConfigError
from fewshot.io import CHECKPOINT_FORMAT, CHECKPOINT_FORMAT_VERSION, read_file_pair
from fewshot.methods.prefix_captioning import PrefixCaptioner, open_caption_lm
from fewshot.methods.vision_language import check_same_image_tower
from fewshot.models.transformer import TokenTrunk

__all__ = ["ClipCap", "ClipCapConfig", "MLPMapper", "TransformerMapper"]

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


class ClipCap(PrefixCaptioner):
    """Frozen image embedding → mapper → k prefix embeddings → the causal LM's caption cross-entropy."""

    config_class = ClipCapConfig

    def __init__(self, config: RunConfig) -> None:
        super().__init__()
        m = config.method
        if m.image.init is None:
            raise ConfigError("method 'clipcap' maps a frozen image embedding: set method.image.init=RUN_DIR (e.g. a clip-scenes run)")
        self.encoder = self.build_encoder(config)
        self.image_projection = self._load_image_tower(config, m.image.init)
        self.encoder.requires_grad_(False)
        self.language_model = link = open_caption_lm(config)
        if not m.lm.tune:
            self.freeze_lm()
        self.prefix_length = m.prefix_length
        self.set_max_tokens(config)
        embed_dim = self.encoder.dim if self.image_projection is None else self.image_projection.out_features
        if m.mapper == "mlp":
            self.mapper: nn.Module = MLPMapper(embed_dim, link.dim, m.prefix_length)
        else:
            if link.dim % m.mapper_heads:
                raise ConfigError(f"method.mapper_heads={m.mapper_heads} must divide the LM's width {link.dim}")
            self.mapper = TransformerMapper(embed_dim, link.dim, m.prefix_length, m.mapped_tokens or m.prefix_length,
                                            m.mapper_depth, m.mapper_heads)
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
