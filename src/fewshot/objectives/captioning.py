"""Captioning through a language model: the caption sequence with its EOS, its labels, and the loss.

The sequence of one image is ``s`` start ids, ``k`` prefix embeddings, then the caption's n tokens and EOS;
P = s + k positions come before the caption. Only the caption's tokens and the appended EOS are predicted.
"""

from __future__ import annotations

import torch

from fewshot.data.token_ids import IGNORE_INDEX, PAD_ID
from fewshot.objectives.language import token_cross_entropy

__all__ = ["append_eos", "caption_labels", "caption_loss", "token_weighted_mean"]


def append_eos(tokens: torch.Tensor, eos_id: int, pad_id: int = PAD_ID) -> torch.Tensor:
    """Captions (B, T) right-padded with ``pad_id`` → (B, T + 1) with ``eos_id`` right after each caption's last token."""
    b, t = tokens.shape
    out = torch.cat([tokens, torch.full((b, 1), pad_id, dtype=tokens.dtype, device=tokens.device)], dim=1)
    out[torch.arange(b, device=tokens.device), (tokens != pad_id).sum(dim=1)] = eos_id
    return out


def caption_labels(before: int, ids: torch.Tensor, pad_id: int = PAD_ID) -> torch.Tensor:
    """Labels (B, before + L) of a sequence of ``before`` positions (start ids + prefix) then ``ids`` (B, L)
    (caption ⊕ EOS ⊕ padding): the ids themselves, IGNORE_INDEX at the first ``before`` positions and at padding."""
    ignored = torch.full((ids.shape[0], before), IGNORE_INDEX, dtype=torch.long, device=ids.device)
    return torch.cat([ignored, ids.long().masked_fill(ids == pad_id, IGNORE_INDEX)], dim=1)


def caption_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean negative log-likelihood of the caption tokens and their EOS given the start ids, the prefix and the
    caption's earlier tokens:

        L = −(1/|M|) Σ_{(b,j) ∈ M} log softmax(logits[b, j − 1])[labels[b, j]],   M = {(b, j) : j ≥ 1, labels[b, j] ≠ IGNORE}

    logits (B, N, V) at every position of the sequence (position j − 1 predicts position j); labels (B, N) from
    :func:`caption_labels`, so M holds exactly the caption's n_b tokens and its EOS: prefix and padding never count."""
    if logits.ndim != 3 or labels.shape != logits.shape[:2]:
        raise ValueError(f"logits must be (B, N, V) and labels (B, N); got {tuple(logits.shape)} and {tuple(labels.shape)}")
    return token_cross_entropy(logits[:, :-1], labels[:, 1:])


def token_weighted_mean(parts: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """One mean negative log-likelihood over the targeted tokens of several (logits, labels) pairs (batches of
    different lengths, each padded only to its own), each pair's :func:`caption_loss` weighted by its count:

        L = Σ_k |M_k| · L_k / Σ_k |M_k|,   M_k the targeted positions of pair k."""
    counts = [int((labels[:, 1:] != IGNORE_INDEX).sum()) for _, labels in parts]
    return sum(caption_loss(logits, labels) * n for (logits, labels), n in zip(parts, counts)) / sum(counts)
