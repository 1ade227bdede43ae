"""Language models on the shared transformer blocks: a causal GPT and a bidirectional masked LM.

Both are token embedding + learned positional embedding → pre-norm :class:`Block` s → final
LayerNorm → LM head whose weight IS the token embedding (tied, Press & Wolf 2017). ``forward``
takes full sequences (the caller puts [BOS] / [CLS] first) and returns logits; ``embed`` takes
plain text tokens, adds the start token itself and returns one vector per sequence, r: (B, dim).
"""

from __future__ import annotations

import torch
from torch import nn

from fewshot.data.tokenizer import BOS_ID, CLS_ID
from fewshot.models.transformer import Block, KeyValues


def prepend(tokens: torch.Tensor, token_id: int) -> torch.Tensor:
    """(B, T) → (B, 1 + T) with ``token_id`` first."""
    start = torch.full((tokens.shape[0], 1), token_id, dtype=tokens.dtype, device=tokens.device)
    return torch.cat([start, tokens], dim=1)


def _drop_tied_head(module: nn.Module, state_dict: dict, prefix: str, local_metadata: dict) -> None:
    state_dict.pop(prefix + "head.weight", None)


def _fill_tied_head(module: nn.Module, state_dict: dict, prefix: str, *args) -> None:
    if prefix + "tok_emb.weight" in state_dict:
        state_dict[prefix + "head.weight"] = state_dict[prefix + "tok_emb.weight"]


class TextTransformer(nn.Module):
    """Embeddings → blocks → LayerNorm → tied LM head. ``causal`` picks GPT or masked-LM attention."""

    start_id: int
    default_pool: str

    def __init__(
        self, vocab_size: int, max_len: int, dim: int = 128, depth: int = 4, heads: int = 4, mlp_ratio: float = 4.0, causal: bool = False
    ) -> None:
        super().__init__()
        self.dim, self.max_len, self.vocab_size, self.causal = dim, max_len, vocab_size, causal
        self.tok_emb = nn.Embedding(vocab_size, dim)
        self.pos_emb = nn.Parameter(torch.zeros(1, max_len, dim))
        self.blocks = nn.ModuleList(Block(dim, heads, mlp_ratio, causal) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab_size, bias=False)
        self.apply(self._init)
        nn.init.normal_(self.pos_emb, std=0.02)
        self.head.weight = self.tok_emb.weight  # tied: one Parameter, one storage
        # safetensors refuses two names for one storage: the state dict keeps only tok_emb.weight.
        self.register_state_dict_post_hook(_drop_tied_head)
        self.register_load_state_dict_pre_hook(_fill_tied_head)

    @staticmethod
    def _init(m: nn.Module) -> None:
        # GPT-2's initialisation: N(0, 0.02) weights, zero biases.
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    def forward_tokens(
        self,
        tokens: torch.Tensor,
        prefix: torch.Tensor | None = None,
        past: list[KeyValues] | None = None,
        return_kv: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, list[KeyValues]]:
        """Hidden states after the final LayerNorm, (B, P + T, dim).

        tokens: (B, T) ids. prefix: optional (B, P, dim) embeddings placed before the tokens
        (prefix tuning, image prefixes); they take positions 0..P−1. past: per-block keys and
        values of earlier positions (the KV cache); this call's positions continue after them.
        ``return_kv`` also returns the per-block (past + new) keys and values.
        """
        x = self.tok_emb(tokens)
        if prefix is not None:
            x = torch.cat([prefix.to(x.dtype), x], dim=1)
        start = 0 if past is None else past[0][0].shape[2]
        if start + x.shape[1] > self.max_len:
            raise ValueError(f"{start + x.shape[1]} positions exceed the model's context of {self.max_len}")
        x = x + self.pos_emb[:, start : start + x.shape[1]]
        new_past = []
        for i, block in enumerate(self.blocks):
            if return_kv:
                x, kv = block(x, None if past is None else past[i], return_kv=True)
                new_past.append(kv)
            else:
                x = block(x, None if past is None else past[i])
        x = self.norm(x)
        return (x, new_past) if return_kv else x

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.head(hidden)

    def forward(
        self,
        tokens: torch.Tensor,
        prefix: torch.Tensor | None = None,
        past: list[KeyValues] | None = None,
        return_kv: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, list[KeyValues]]:
        """Logits (B, T, vocab) at the token positions (prefix positions have no targets)."""
        out = self.forward_tokens(tokens, prefix, past, return_kv)
        hidden, kv = out if return_kv else (out, None)
        logits = self.logits(hidden[:, hidden.shape[1] - tokens.shape[1] :])
        return (logits, kv) if return_kv else logits

    def embed(self, tokens: torch.Tensor, pool: str | None = None) -> torch.Tensor:
        """r: (B, dim) for plain text tokens (B, T): the start token is added here.

        pool: "cls" (the start token's state: [CLS] for the masked LM), "mean" (mean over the
        text tokens, start token excluded) or "last" (the last token: all a causal model has seen).
        """
        pool = pool or self.default_pool
        h = self.forward_tokens(prepend(tokens, self.start_id))
        if pool == "cls":
            return h[:, 0]
        if pool == "mean":
            return h[:, 1:].mean(dim=1)
        if pool == "last":
            return h[:, -1]
        raise ValueError(f"unknown pool '{pool}'; choose cls, mean or last")


class GPT(TextTransformer):
    """Causal language model (Radford et al. 2018): position t attends to positions ≤ t; [BOS] starts
    every sequence, so the first text token is predicted too. r = mean-pooled hidden states."""

    start_id = BOS_ID
    default_pool = "mean"

    def __init__(self, vocab_size: int, max_len: int, dim: int = 128, depth: int = 4, heads: int = 4, mlp_ratio: float = 4.0) -> None:
        super().__init__(vocab_size, max_len, dim, depth, heads, mlp_ratio, causal=True)


class MaskedLM(TextTransformer):
    """Bidirectional masked language model (Devlin et al. 2019, BERT): [CLS] first; r = [CLS]'s state.

    As BERT's reference code, the MLM head is dense → GELU → LayerNorm before the tied decoder.
    """

    start_id = CLS_ID
    default_pool = "cls"

    def __init__(self, vocab_size: int, max_len: int, dim: int = 128, depth: int = 4, heads: int = 4, mlp_ratio: float = 4.0) -> None:
        super().__init__(vocab_size, max_len, dim, depth, heads, mlp_ratio, causal=False)
        self.transform = nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.LayerNorm(dim))
        self._init(self.transform[0])

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.head(self.transform(hidden))
