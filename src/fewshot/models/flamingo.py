"""Flamingo (Alayrac et al. 2022), in open_flamingo's structure: a frozen causal LM that reads images through
gated cross-attention.

* :class:`PerceiverResampler`: a fixed number of learned latents read a frozen image encoder's token features
  (B, S, D_v). In each of its layers the latents' queries attend to keys and values of the features concatenated
  with the latents themselves, [LN(features); LN(latents)], then a feed-forward layer; both residual. Output
  (B, latents, D_v) after a final LayerNorm.
* :class:`GatedCrossAttentionBlock`: ``x + tanh(α_attn)·XAttn(LN(x), media)`` then ``+ tanh(α_ff)·FF(x)``, both gates
  initialised at 0, so at initialisation the block returns its input exactly and the wrapped LM's logits are the
  frozen LM's.
* :func:`media_mask`: each token attends only to the latents of the last ``<image>`` marker at or before it
  (open_flamingo: the marker itself sees its own image); a token before the first marker attends to none and its
  cross-attention output is exactly zero, so it does not depend on any image.
* :class:`FlamingoLM`: a frozen causal LM (fewshot's GPT or a Hugging Face one) wrapped, not edited: a gated block
  runs before every ``cross_every``-th frozen layer (before layer i when (i + 1) % cross_every == 0, as open_flamingo),
  as a forward pre-hook of that layer, on its input. Two new tokens, ``<image>``
  (id V) and ``<|endofchunk|>`` (id V + 1) for an LM of V ids, have their own small trainable embedding; the
  frozen table is never resized, and the new tokens' logits come from the same new embedding applied to what the LM's
  head reads (tied, as the GPT's decoder). The KV cache covers the whole wrapped model: :class:`FlamingoState` holds the frozen blocks' keys and
  values, the resampled media and how many markers each row has passed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from fewshot.errors import ConfigError
from fewshot.models.hf_text import decoder_layer_slot
from fewshot.models.language import LanguageModel
from fewshot.models.transformer import Attention, KeyValues

__all__ = ["FlamingoLM", "FlamingoState", "GatedCrossAttentionBlock", "PerceiverResampler", "image_token_features",
           "image_token_width", "masked_cross_attention", "media_mask"]

IMAGE_TOKEN, END_OF_CHUNK_TOKEN = "<image>", "<|endofchunk|>"


def feed_forward(dim: int, mlp_ratio: float) -> nn.Sequential:
    """LN → Linear(dim, ratio·dim) → GELU → Linear(ratio·dim, dim): the FF of the resampler and the gated blocks."""
    hidden = int(dim * mlp_ratio)
    return nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))


# ----------------------------------------------------------------------------------------------- the image side


def image_token_width(encoder: nn.Module) -> int:
    """D_v of :func:`image_token_features`: a token encoder's width, a conv net's channels, else r's width."""
    if hasattr(encoder, "forward_tokens"):
        return int(encoder.dim)
    if hasattr(encoder, "grid") and hasattr(encoder, "features"):
        return int(encoder.grid[0])
    return int(encoder.dim)


def image_token_features(encoder: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Images (B, C, H, W) → token features (B, S, D_v): ``forward_tokens`` when the encoder has it (ViT), a conv
    net's last feature map as its h·w positions (Conv-4's ``features``; Flamingo reads the vision encoder's final
    spatial grid), else r as one token."""
    if hasattr(encoder, "forward_tokens"):
        return encoder.forward_tokens(images)
    if hasattr(encoder, "grid") and hasattr(encoder, "features"):
        return encoder.features(images).flatten(2).transpose(1, 2)
    return encoder(images)[:, None]


class ResamplerLayer(nn.Module):
    """One Perceiver Resampler layer: latents + Attn(q = LN_l(latents), kv = [LN_m(x); LN_l(latents)]), then + FF."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.norm_media, self.norm_latents = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = Attention(dim, heads, context_dim=dim)
        self.ff = feed_forward(dim, mlp_ratio)

    def forward(self, features: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        queries = self.norm_latents(latents)
        latents = latents + self.attn(queries, context=torch.cat([self.norm_media(features), queries], dim=1))
        return latents + self.ff(latents)


class PerceiverResampler(nn.Module):
    """``latents`` learned vectors (B-independent) read features (B, S, D_v) through ``depth`` :class:`ResamplerLayer`
    s; output (B, latents, D_v) after a final LayerNorm. Flamingo: 64 latents, depth 6."""

    def __init__(self, dim: int, latents: int = 64, depth: int = 6, heads: int = 8, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        if dim % heads:
            raise ConfigError(f"the resampler's {heads} heads must divide the image features' width {dim}")
        self.latents = nn.Parameter(torch.randn(latents, dim) * 0.02)
        self.layers = nn.ModuleList(ResamplerLayer(dim, heads, mlp_ratio) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        latents = self.latents.expand(features.shape[0], -1, -1)
        for layer in self.layers:
            latents = layer(features, latents)
        return self.norm(latents)


# ----------------------------------------------------------------------------------------------- the text side


def media_mask(ids: torch.Tensor, image_id: int, images: int, latents: int, images_before: torch.Tensor | None = None) -> torch.Tensor:
    """Which media keys each token may attend: (B, T, images·latents) bool.

    With m_t = images_before + #{s ≤ t : ids[s] = <image>} (the number of markers at or before t, counting those
    of earlier cached calls), token t attends key j (latent j mod L of image ⌊j / L⌋ + 1) iff ⌊j / L⌋ + 1 = m_t:
    the latents of the last marker at or before it. m_t = 0 (text before the first image) attends to none."""
    seen = (ids == image_id).long().cumsum(dim=1)
    if images_before is not None:
        seen = seen + images_before[:, None]
    key_image = torch.arange(images * latents, device=ids.device) // latents + 1
    return seen[:, :, None] == key_image


def masked_cross_attention(attn: Attention, x: torch.Tensor, context: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Cross-attention ``attn`` under a per-query mask:

        out_t = W_o concat_h softmax_{j : mask[t, j]}(q_t^h · k_j^h / √d_h) v_j^h + b_o,   and out_t = 0 exactly
        when mask[t] has no True (a token with no image before it).

    x (B, T, D), context (B, S, D_c), mask (B, T, S) bool (True = attend)."""
    if context.shape[1] == 0:
        return torch.zeros_like(x)
    return attn(x, context=context, attn_mask=mask).masked_fill(~mask.any(dim=-1)[:, :, None], 0.0)


class GatedCrossAttentionBlock(nn.Module):
    """x ← x + tanh(α_attn)·XAttn(LN(x), media, mask); x ← x + tanh(α_ff)·FF(x), with α_attn = α_ff = ``gate_init``
    (0 in Flamingo: the block starts as the identity)."""

    def __init__(self, dim: int, media_dim: int, heads: int, mlp_ratio: float = 4.0, gate_init: float = 0.0) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads, context_dim=media_dim)
        self.attn_gate = nn.Parameter(torch.tensor(float(gate_init)))
        self.ff = feed_forward(dim, mlp_ratio)
        self.ff_gate = nn.Parameter(torch.tensor(float(gate_init)))

    def forward(self, x: torch.Tensor, media: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = x + torch.tanh(self.attn_gate) * masked_cross_attention(self.attn, self.norm(x), media, mask)
        return x + torch.tanh(self.ff_gate) * self.ff(x)


@dataclass
class FlamingoState:
    """What a cached call continues: ``media`` (B, N·L, D_v) resampled images, ``images`` (B,) how many images each
    row was given, ``seen`` (B,) markers passed so far, ``past`` the frozen blocks' keys and values (None at first)."""

    media: torch.Tensor
    images: torch.Tensor
    seen: torch.Tensor
    past: list[KeyValues] | None = field(default=None)

    @property
    def length(self) -> int:
        return 0 if self.past is None else int(self.past[0][0].shape[2])


class FlamingoLM(nn.Module):
    """A frozen causal LM (``lm``) with a Perceiver Resampler, gated cross-attention blocks and the two new tokens.

    ``lm`` is fewshot's GPT (:class:`~fewshot.models.language.LanguageModel`, causal) or a Hugging Face causal LM (GPT-2,
    Llama / SmolLM2: anything whose base model keeps its decoder layers in ``layers`` or ``h`` and takes
    ``inputs_embeds``). Neither is edited: each gated block runs in a forward pre-hook of the frozen layer it precedes,
    on that layer's input, and only while :meth:`step` conditions the call on media; the LM's own call does the rest
    (positions, its blocks and their KV cache, the final norm and head).

    ``start(features, image_counts)`` resamples token features (B, N, S, D_v) of N images per row (rows with fewer
    images pad the rest; ``image_counts`` (B,) says how many are real) into a :class:`FlamingoState`;
    ``step(ids, state)`` gives logits (B, T, V + 2) of ids placed after the state's cached positions and the
    extended state; ``forward(ids, features, image_counts)`` is both at once after checking that each row has as
    many ``<image>`` markers as images."""

    def __init__(self, lm: nn.Module, media_dim: int, latents: int = 64, resampler_depth: int = 6, resampler_heads: int = 8,
                 cross_every: int = 1, cross_heads: int = 8, mlp_ratio: float = 4.0, gate_init: float = 0.0) -> None:
        super().__init__()
        self.is_gpt = isinstance(lm, LanguageModel)
        if self.is_gpt:
            if not lm.causal:
                raise ConfigError("Flamingo wraps a causal language model (a gpt run)")
            table, layers = lm.encoder.tok_emb, list(lm.encoder.trunk.blocks)
            self.context = int(lm.max_len)
        else:
            slot = decoder_layer_slot(lm)
            table, layers = lm.get_input_embeddings(), list(getattr(*slot)) if slot else []
            config = lm.config
            self.context = int(getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions"))
            if not layers:
                raise ConfigError(f"{type(lm).__name__}: no decoder layers found (base model's layers or h) to insert gated blocks before")
        self.dim, self.vocab_size = int(table.weight.shape[1]), int(table.weight.shape[0])
        if self.dim % cross_heads:
            raise ConfigError(f"the gated blocks' {cross_heads} heads must divide the LM's width {self.dim}")
        if cross_every < 1:
            raise ConfigError(f"cross_every must be ≥ 1, got {cross_every}")
        self.image_id, self.chunk_id = self.vocab_size, self.vocab_size + 1
        self.lm = lm.requires_grad_(False)
        self.resampler = PerceiverResampler(media_dim, latents, resampler_depth, resampler_heads, mlp_ratio)
        self.cross_layers = [i for i in range(len(layers)) if (i + 1) % cross_every == 0]
        if not self.cross_layers:
            raise ConfigError(f"cross_every={cross_every} exceeds the LM's {len(layers)} layers: no gated block would be inserted")
        self.gated = nn.ModuleList(GatedCrossAttentionBlock(self.dim, media_dim, cross_heads, mlp_ratio, gate_init) for _ in self.cross_layers)
        self.new_tokens = nn.Embedding(2, self.dim)
        nn.init.normal_(self.new_tokens.weight, std=0.02)
        self.latents = latents
        self._condition: tuple[torch.Tensor, torch.Tensor] | None = None  # (media, mask) during a step only
        self._captured: list[torch.Tensor] | None = None  # the residual entering each gated layer, while capturing
        for block, i in zip(self.gated, self.cross_layers):
            layers[i].register_forward_pre_hook(self._gate_before(block), with_kwargs=True)

    def _gate_before(self, block: GatedCrossAttentionBlock):
        def hook(layer: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
            x = args[0] if args else kwargs["hidden_states"]
            if self._condition is not None:  # else the LM called on its own: untouched
                x = block(x, *self._condition)
            if self._captured is not None:
                self._captured.append(x)
            if self._condition is None:
                return None
            return ((x, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": x})
        return hook

    def residuals(self, ids: torch.Tensor, features: torch.Tensor | None = None,
                  image_counts: torch.Tensor | None = None) -> tuple[torch.Tensor | None, list[torch.Tensor]]:
        """Logits (B, T, V + 2) and the residual stream (B, T, D) entering each gated layer, after its gated block:
        of the wrapped model on ``ids`` with ``features`` (as :meth:`forward`); or, when ``features`` is None, no
        logits (None: the LM's head is not run) and the residuals of the frozen LM alone on text ``ids`` (< V)."""
        self._captured = captured = []
        try:
            if features is not None:
                logits = self(ids, features, image_counts)
            else:
                logits = None
                self._run_lm(self.table(ids), None, keep=1)  # a teacher's residuals: the head's (B, T, V) would be wasted
        finally:
            self._captured = None
        return logits, captured

    def train(self, mode: bool = True) -> "FlamingoLM":
        super().train(mode)
        self.lm.eval()  # frozen
        return self

    @property
    def table(self) -> nn.Embedding:
        """The frozen LM's input embedding table (V, D)."""
        return self.lm.encoder.tok_emb if self.is_gpt else self.lm.get_input_embeddings()

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """Embeddings (B, T, D): the frozen table for ids < V, the new trainable one for <image> and <|endofchunk|>."""
        new = ids >= self.vocab_size
        old = self.table(ids.masked_fill(new, 0))
        return torch.where(new[..., None], self.new_tokens((ids - self.vocab_size).clamp(min=0)).to(old.dtype), old)

    def start(self, features: torch.Tensor, image_counts: torch.Tensor | None = None) -> FlamingoState:
        """Token features (B, N, S, D_v) → the state before the first token: media (B, N·latents, D_v)."""
        if features.ndim != 4:
            raise ConfigError(f"image features must be (batch, images, tokens, width), got {tuple(features.shape)}")
        b, n = features.shape[:2]
        if n:
            media = self.resampler(features.flatten(0, 1)).reshape(b, n * self.latents, -1)
        else:
            media = features.new_zeros(b, 0, features.shape[-1])
        counts = torch.full((b,), n, dtype=torch.long, device=features.device) if image_counts is None else image_counts.long()
        return FlamingoState(media, counts, torch.zeros(b, dtype=torch.long, device=features.device))

    def _run_lm(self, embeds: torch.Tensor, past: list[KeyValues] | None,
                keep: int = 0) -> tuple[torch.Tensor, torch.Tensor, list[KeyValues]]:
        """The frozen LM on input embeddings after its cache: (logits over its V ids, the hidden states its head reads,
        the extended cache); logits and hidden states at the last ``keep`` positions only when ``keep`` > 0 (the
        head, V × D per position, is a fifth of SmolLM2's cost a token)."""
        if self.is_gpt:
            no_tokens = torch.empty(embeds.shape[0], 0, dtype=torch.long, device=embeds.device)
            hidden, kv = self.lm.encoder.hidden(no_tokens, prefix=embeds, past=past, return_kv=True)
            h = self.lm.head(hidden[:, -keep:] if keep else hidden)
            return F.linear(h, self.lm.encoder.tok_emb.weight), h, list(kv)
        from transformers import DynamicCache

        cache = DynamicCache(ddp_cache_data=past) if past is not None else DynamicCache()
        read: list[torch.Tensor] = []
        handle = self.lm.get_output_embeddings().register_forward_pre_hook(lambda head, args: read.append(args[0]))
        try:
            logits = self.lm(inputs_embeds=embeds, cache=cache, use_cache=True, logits_to_keep=keep).logits
        finally:
            handle.remove()
        return logits, read[0], [(layer.keys, layer.values) for layer in cache.layers]

    def step(self, ids: torch.Tensor, state: FlamingoState, last_only: bool = False) -> tuple[torch.Tensor, FlamingoState]:
        """Logits (B, T, V + 2) of ``ids`` (B, T) after the state's cached positions, and the state extended by them;
        ``last_only``: the logits (B, 1, V + 2) of the last position only (what a prompt's prefill needs)."""
        start, t = state.length, ids.shape[1]
        if start + t > self.context:
            raise ConfigError(f"an interleaved sequence of {start + t} positions is {start + t - self.context} longer than "
                              f"the language model's context of {self.context}")
        markers = (ids == self.image_id).sum(dim=1)
        over = (state.seen + markers > state.images).nonzero()
        if len(over):
            row = int(over[0])
            raise ConfigError(f"row {row} has more {IMAGE_TOKEN} markers ({int(state.seen[row] + markers[row])}) than images "
                              f"({int(state.images[row])})")
        n_images = state.media.shape[1] // self.latents
        self._condition = (state.media, media_mask(ids, self.image_id, n_images, self.latents, state.seen))
        try:
            logits, h, present = self._run_lm(self.embed(ids), state.past, keep=int(last_only))
        finally:
            self._condition = None
        logits = torch.cat([logits, F.linear(h, self.new_tokens.weight.to(h.dtype)).to(logits.dtype)], dim=-1)
        return logits, FlamingoState(state.media, state.images, state.seen + markers, present)

    def forward(self, ids: torch.Tensor, features: torch.Tensor, image_counts: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (B, T, V + 2) of whole interleaved sequences ``ids`` (B, T) with their images' token features
        (B, N, S, D_v); a row whose ``<image>`` markers do not number its images is refused."""
        counts = torch.full((ids.shape[0],), features.shape[1], dtype=torch.long, device=ids.device) if image_counts is None else image_counts
        self.check_markers(ids, counts)
        return self.step(ids, self.start(features, counts))[0]

    def check_markers(self, ids: torch.Tensor, image_counts: torch.Tensor) -> None:
        """A one-line error unless each row of ``ids`` (B, T) has as many ``<image>`` markers as its images (B,)."""
        markers = (ids == self.image_id).sum(dim=1)
        wrong = (markers != image_counts.to(markers)).nonzero()
        if len(wrong):
            row = int(wrong[0])
            raise ConfigError(f"row {row} has {int(markers[row])} {IMAGE_TOKEN} marker(s) but {int(image_counts[row])} image(s): "
                              "each image needs exactly one marker")
