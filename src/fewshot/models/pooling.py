"""CoCa's attentional pooler (Yu et al. 2022, "CoCa: Contrastive Captioners are Image-Text Foundation
Models", §3.2): n learned queries cross-attend an encoder's tokens, so one image gives n task-specific
embeddings however many tokens its tower has.

    out = LN( Attention(q = Q, k = v = LN(tokens)) ),   Q (n, dim) learned,  tokens (B, L, context_dim) → (B, n, dim)

CoCa uses the first query's output as the contrastive image embedding and the rest (256 in the
paper) as the image tokens its multimodal decoder cross-attends, as open_clip's single pooler does.
"""

from __future__ import annotations

import torch
from torch import nn

from fewshot.models.transformer import Attention

__all__ = ["AttentionalPooler"]


class AttentionalPooler(nn.Module):
    """``queries`` learned queries → (B, queries, dim) from tokens (B, L, context_dim), by the trunk's cross-attention."""

    def __init__(self, dim: int, context_dim: int, queries: int, heads: int) -> None:
        super().__init__()
        self.query = nn.Parameter(torch.randn(queries, dim) * 0.02)
        self.norm_context = nn.LayerNorm(context_dim)
        self.attn = Attention(dim, heads, context_dim=context_dim)
        self.norm = nn.LayerNorm(dim)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        queries = self.query.to(tokens.dtype).expand(tokens.shape[0], -1, -1)
        return self.norm(self.attn(queries, context=self.norm_context(tokens)))
