"""BLIP-2's Querying Transformer (Li et al. 2023, "BLIP-2: Bootstrapping Language-Image Pre-training with
Frozen Image Encoders and Large Language Models", Sec. 3.1–3.2).

Q learned query embeddings and the text's tokens share one stack of layers. Each layer: self-attention over
[queries; text] under one of three masks, cross-attention from the queries (never the text) to the frozen
image tokens in every ``cross_every``-th layer (BLIP-2: every other), then a feed-forward net of its own for
the queries and another for the text (BLIP-2 initialises the two from the same BERT weights; here both are
new). Pre-norm blocks and a final norm as the rest of the house (BLIP-2 is post-norm BERT-base).

The masks (True: query row i may attend key column j), for Q queries and T text positions:

* ``unimodal`` (image–text contrastive): queries see queries, text sees text, neither sees the other;
* ``bidirectional`` (image–text matching): everything sees everything;
* ``multimodal-causal`` (image-grounded text generation): queries see queries only; text position t sees
  every query and the text positions ≤ t.

Padded text keys are never attended. Text alone (no queries) is the unimodal text encoder, queries alone
(no text) the image side of ITC and the soft prompt of stage 2.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from fewshot.models.language import gpt2_init
from fewshot.models.transformer import Attention

__all__ = ["QFORMER_MASKS", "QFormer", "QFormerLayer", "qformer_attention_mask"]

MaskKind = Literal["unimodal", "bidirectional", "multimodal-causal"]
QFORMER_MASKS: tuple[str, ...] = ("unimodal", "bidirectional", "multimodal-causal")


def qformer_attention_mask(kind: str, queries: int, text_padding: torch.Tensor) -> torch.Tensor:
    """The (B, Q + T, Q + T) bool mask of ``kind`` for Q queries and text whose padding is ``text_padding``
    (B, T), True at padded positions; True where row i may attend column j (the module docstring's rules)."""
    if kind not in QFORMER_MASKS:
        raise ValueError(f"unknown Q-Former mask '{kind}'; known: {', '.join(QFORMER_MASKS)}")
    b, t = text_padding.shape
    n = queries + t
    allowed = torch.zeros(n, n, dtype=torch.bool, device=text_padding.device)
    allowed[:queries, :queries] = True
    if kind == "unimodal":
        allowed[queries:, queries:] = True
    elif kind == "bidirectional":
        allowed[:] = True
    else:
        allowed[queries:, :queries] = True
        allowed[queries:, queries:] = torch.ones(t, t, dtype=torch.bool, device=text_padding.device).tril()
    keys = torch.cat([torch.zeros(b, queries, dtype=torch.bool, device=text_padding.device), text_padding], dim=1)
    return allowed[None] & ~keys[:, None, :]


class QFormerLayer(nn.Module):
    """Self-attention over [queries; text] under a mask, [queries → image cross-attention], one FFN per modality."""

    def __init__(self, dim: int, heads: int, image_dim: int | None, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        if image_dim is not None:
            self.norm_cross = nn.LayerNorm(dim)
            self.cross = Attention(dim, heads, context_dim=image_dim)
        hidden = int(dim * mlp_ratio)
        self.norm_query, self.norm_text = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.mlp_query = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))
        self.mlp_text = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor, queries: int, mask: torch.Tensor, image: torch.Tensor | None) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), attn_mask=mask)
        q, t = x[:, :queries], x[:, queries:]
        if queries and hasattr(self, "cross"):
            q = q + self.cross(self.norm_cross(q), context=image)
        q = q + self.mlp_query(self.norm_query(q))
        t = t + self.mlp_text(self.norm_text(t))
        return torch.cat([q, t], dim=1)


class QFormer(nn.Module):
    """Learned queries (and text) over frozen image tokens: ``forward(image, ids, mask)`` → (query states, text states).

    ``image`` (B, L, image_dim) frozen image tokens (needed whenever queries take part); ``ids`` (B, T) text token
    ids right-padded with ``pad_id`` (the caller puts [CLS] or [DEC] first), or None for queries alone; with
    ``image=None`` the text runs alone (the unimodal text encoder). Returns (B, Q, dim) or None, (B, T, dim) or None.
    """

    def __init__(self, image_dim: int, dim: int, depth: int, heads: int, queries: int, vocab_size: int, max_len: int,
                 cross_every: int = 2, pad_id: int = 0) -> None:
        super().__init__()
        self.dim, self.queries, self.vocab_size, self.max_len, self.pad_id = dim, queries, vocab_size, max_len, pad_id
        self.query_tokens = nn.Parameter(torch.randn(1, queries, dim) * 0.02)
        self.token_embed = nn.Embedding(vocab_size, dim)
        self.pos_embed = nn.Parameter(torch.zeros(1, max_len, dim))
        self.layers = nn.ModuleList(QFormerLayer(dim, heads, image_dim if i % cross_every == 0 else None) for i in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.apply(gpt2_init)
        nn.init.normal_(self.pos_embed, std=0.02)

    def text_parameters(self) -> list[nn.Parameter]:
        """What only the text passes through (its embeddings, its norms and FFNs): unused by queries alone."""
        modules = [self.token_embed, *(m for layer in self.layers for m in (layer.norm_text, layer.mlp_text))]
        return [self.pos_embed, *(p for m in modules for p in m.parameters())]

    def forward(self, image: torch.Tensor | None, ids: torch.Tensor | None, mask: str = "unimodal"
                ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        if image is None and ids is None:
            raise ValueError("the Q-Former needs image tokens, text ids or both")
        parts, padding = [], None
        q = 0 if image is None else self.queries
        if q:
            parts.append(self.query_tokens.expand(image.shape[0], -1, -1))
        if ids is not None:
            if ids.shape[1] > self.max_len:
                raise ValueError(f"text of {ids.shape[1]} tokens exceeds the Q-Former's {self.max_len} positions")
            parts.append(self.token_embed(ids) + self.pos_embed[:, : ids.shape[1]])
            padding = ids == self.pad_id
        else:
            padding = torch.zeros(image.shape[0], 0, dtype=torch.bool, device=image.device)
        x = torch.cat(parts, dim=1)
        allowed = qformer_attention_mask(mask, q, padding)
        for layer in self.layers:
            x = layer(x, q, allowed, image)
        x = self.norm(x)
        return (x[:, :q] if q else None), (x[:, q:] if ids is not None else None)
