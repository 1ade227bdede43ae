"""Language models on the token trunk: a causal GPT and a bidirectional masked LM.

Both are a text tower (:class:`TextTransformer`, registered as encoder ``text-transformer``:
token embeddings + learned positions, or rotary ones inside attention → :class:`~fewshot.models.transformer.TokenTrunk`) and a
separate LM head; the logits are ``head(h) · Eᵀ`` with E the tower's token embedding (tied, Press
& Wolf 2017), so the embedding is one Parameter stored once. The tower gives r: (B, dim) for plain
text tokens (it adds the start token itself); :class:`LanguageModel` takes full sequences (the
caller puts [BOS] / [CLS] first) and gives logits.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fewshot.data.tokenizer import BOS_ID, CLS_ID
from fewshot.models.transformer import KeyValues, TokenTrunk


def prepend(tokens: torch.Tensor, token_id: int) -> torch.Tensor:
    """(B, T) → (B, 1 + T) with ``token_id`` first."""
    start = torch.full((tokens.shape[0], 1), token_id, dtype=tokens.dtype, device=tokens.device)
    return torch.cat([start, tokens], dim=1)


def gpt2_init(m: nn.Module) -> None:
    """GPT-2's initialisation: N(0, 0.02) weights, zero biases."""
    if isinstance(m, (nn.Linear, nn.Embedding)):
        nn.init.normal_(m.weight, std=0.02)
    if isinstance(m, nn.Linear) and m.bias is not None:
        nn.init.zeros_(m.bias)


class TextTransformer(nn.Module):
    """The text tower: token ids (B, T) → r (B, dim). ``causal`` picks GPT attention ([BOS] first,
    r = mean of the text tokens' states) or bidirectional masked-LM attention ([CLS] first, r = [CLS])."""

    def __init__(
        self, vocab_size: int, max_len: int, dim: int = 128, depth: int = 4, heads: int = 4, mlp_ratio: float = 4.0, causal: bool = False,
        positions: str = "learned",
    ) -> None:
        super().__init__()
        if positions not in ("learned", "rotary"):
            raise ValueError(f"unknown positions '{positions}'; choose learned or rotary")
        self.dim, self.max_len, self.vocab_size, self.causal, self.positions = dim, max_len, vocab_size, causal, positions
        self.start_id, self.default_pool = (BOS_ID, "mean") if causal else (CLS_ID, "cls")
        # The poolings worth scoring: a causal model's start token has seen nothing but itself.
        self.pools = ("mean",) if causal else ("cls", "mean")
        self.tok_emb = nn.Embedding(vocab_size, dim)
        # learned: one embedding per position, added to the tokens (GPT-2); rotary: positions enter every attention's
        # queries and keys instead, so a head that looks k tokens back is one pattern at every position
        self.pos_emb = nn.Parameter(torch.zeros(1, max_len, dim), requires_grad=False) if positions == "rotary" else nn.Parameter(torch.zeros(1, max_len, dim))
        self.trunk = TokenTrunk(dim, depth, heads, mlp_ratio, causal, rotary=positions == "rotary")
        self.apply(gpt2_init)
        if positions == "learned":
            nn.init.normal_(self.pos_emb, std=0.02)

    def hidden(
        self,
        tokens: torch.Tensor,
        prefix: torch.Tensor | None = None,
        past: list[KeyValues] | None = None,
        padding_mask: torch.Tensor | None = None,
        return_kv: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, list[KeyValues]]:
        """Hidden states of full sequences after the final LayerNorm, (B, P + T, dim).

        tokens: (B, T) ids. prefix: optional (B, P, dim) embeddings placed before the tokens
        (prefix tuning, image prefixes); they take positions 0..P−1. past: per-block keys and
        values of earlier positions (the KV cache); this call's positions continue after them.
        padding_mask: (B, past + P + T) bool, True at padding. ``return_kv``: also the per-block keys/values.
        """
        x = self.tok_emb(tokens)
        if prefix is not None:
            x = torch.cat([prefix.to(x.dtype), x], dim=1)
        start = 0 if past is None else past[0][0].shape[2]
        if start + x.shape[1] > self.max_len:
            raise ValueError(f"{start + x.shape[1]} positions exceed the model's context of {self.max_len}")
        return self.trunk(x + self.pos_emb[:, start : start + x.shape[1]], past, padding_mask, return_kv=return_kv)

    def forward_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """Plain text tokens (B, T) → states of [start] + tokens, (B, 1 + T, dim), as the ViT's [CLS] + patches."""
        return self.hidden(prepend(tokens, self.start_id))

    def embed(self, tokens: torch.Tensor, pool: str | None = None) -> torch.Tensor:
        """r: (B, dim) for plain text tokens (B, T).

        pool: "cls" (the start token's state: [CLS] for the masked LM), "mean" (mean over the
        text tokens, start token excluded) or "last" (the last token: all a causal model has seen).
        """
        pool = pool or self.default_pool
        h = self.forward_tokens(tokens)
        if pool == "cls":
            return h[:, 0]
        if pool == "mean":
            return h[:, 1:].mean(dim=1)
        if pool == "last":
            return h[:, -1]
        raise ValueError(f"unknown pool '{pool}'; choose cls, mean or last")

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.embed(tokens)


class LanguageModel(nn.Module):
    """``.encoder`` (the text tower, r) + ``.head`` (applied before the tied decoder Eᵀ)."""

    def __init__(self, encoder: TextTransformer, head: nn.Module) -> None:
        super().__init__()
        self.encoder, self.head = encoder, head

    @property
    def causal(self) -> bool:
        return self.encoder.causal

    @property
    def max_len(self) -> int:
        return self.encoder.max_len

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return F.linear(self.head(hidden), self.encoder.tok_emb.weight)

    def forward(
        self,
        tokens: torch.Tensor,
        prefix: torch.Tensor | None = None,
        past: list[KeyValues] | None = None,
        padding_mask: torch.Tensor | None = None,
        return_kv: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, list[KeyValues]]:
        """Logits (B, T, vocab) at the token positions (prefix positions have no targets)."""
        out = self.encoder.hidden(tokens, prefix, past, padding_mask, return_kv)
        hidden, kv = out if return_kv else (out, None)
        logits = self.logits(hidden[:, hidden.shape[1] - tokens.shape[1] :])
        return (logits, kv) if return_kv else logits


class GPT(LanguageModel):
    """Causal language model (Radford et al. 2018): position t attends to positions ≤ t; [BOS] starts
    every sequence, so the first text token is predicted too. The head is the tied decoder alone."""

    def __init__(self, vocab_size: int, max_len: int, dim: int = 128, depth: int = 4, heads: int = 4, mlp_ratio: float = 4.0) -> None:
        super().__init__(TextTransformer(vocab_size, max_len, dim, depth, heads, mlp_ratio, causal=True), nn.Identity())


class MaskedLM(LanguageModel):
    """Bidirectional masked language model (Devlin et al. 2019, BERT): [CLS] first.

    As BERT's reference code, the MLM head is dense → GELU → LayerNorm before the tied decoder.
    """

    def __init__(self, vocab_size: int, max_len: int, dim: int = 128, depth: int = 4, heads: int = 4, mlp_ratio: float = 4.0) -> None:
        encoder = TextTransformer(vocab_size, max_len, dim, depth, heads, mlp_ratio, causal=False)
        super().__init__(encoder, mlm_head(dim))


def mlm_head(dim: int) -> nn.Module:
    """BERT's MLM transform before the tied decoder: dense → GELU → LayerNorm."""
    head = nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.LayerNorm(dim))
    gpt2_init(head[0])
    return head
