"""Language-model objectives: cross-entropy on the targeted token positions."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fewshot.data.masking import IGNORE_INDEX


def token_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Mean negative log-likelihood of the target tokens over the targeted positions M:

        L = −(1/|M|) Σ_{(b,t) ∈ M} log softmax(logits[b, t])[y_bt],   M = {(b, t) : y_bt ≠ ignore_index}

    Causal LM (GPT; Radford et al. 2018): y_t = x_{t+1}, every position targeted
    (``fewshot.data.masking.causal_targets``). Masked LM (BERT; Devlin et al. 2019): y is the
    original token at the ~15% chosen positions, ``ignore_index`` elsewhere (``bert_mask``).

    logits: (B, T, V); targets: (B, T) int64. Returns a scalar; 0 (with a gradient path) when no
    position is targeted, instead of cross_entropy's 0/0 = NaN.
    """
    if logits.ndim != 3 or targets.shape != logits.shape[:2]:
        raise ValueError(f"logits must be (B, T, V) and targets (B, T); got {tuple(logits.shape)} and {tuple(targets.shape)}")
    total = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=ignore_index, reduction="sum")
    return total / (targets != ignore_index).sum().clamp(min=1)
