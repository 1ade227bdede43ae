"""BLIP-2's stage-1 objectives (Li et al. 2023, Sec. 3.2), pure functions of the Q-Former's outputs.

Image–text contrastive (ITC): each image has Q query embeddings z_i1 … z_iQ, each text one embedding t_j (its
[CLS] state), all ℓ2-normalised after their projections. The pair's similarity is the best query's,

    s_ij = max_q ⟨z_iq, t_j⟩,

and the loss CLIP's symmetric cross-entropy on s / τ (image → text over the rows of s, text → image over its
columns), with the targets of :func:`fewshot.objectives.clip.clip_targets` (identical captions are positives).

Image–text matching (ITM) draws, for every image, one negative text with probability ∝ softmax_j(s_ij) over the
texts that are not its positives, and for every text one negative image ∝ softmax_i(s_ij) likewise (BLIP's hard
negative mining, Li et al. 2022): pairs the contrastive head finds most alike. A row whose every other text
is a positive (all captions identical) has no negative and is left out.

Image-grounded text generation (ITG) is the captioning cross-entropy of :mod:`fewshot.objectives.captioning`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fewshot.objectives.clip import clip_targets

__all__ = ["hard_negatives", "itc_loss", "itc_similarity"]


def itc_similarity(queries: torch.Tensor, texts: torch.Tensor) -> torch.Tensor:
    """s (B_images, B_texts), s_ij = max_q ⟨queries[i, q], texts[j]⟩ for queries (B_i, Q, E) and texts (B_t, E)."""
    if queries.ndim != 3 or texts.ndim != 2 or queries.shape[-1] != texts.shape[-1]:
        raise ValueError(f"queries must be (B, Q, E) and texts (B, E); got {tuple(queries.shape)} and {tuple(texts.shape)}")
    return torch.einsum("iqe,je->ijq", queries, texts).amax(dim=-1)


def itc_loss(similarity: torch.Tensor, temperature: torch.Tensor | float, caption_keys: torch.Tensor | None = None) -> torch.Tensor:
    """½ [CE(s/τ, P) + CE(sᵀ/τ, P)] for the square similarity s of :func:`itc_similarity`; P from the caption keys
    (the diagonal without them)."""
    n = similarity.shape[0]
    if similarity.shape != (n, n):
        raise ValueError(f"similarity must be square (images = texts), got {tuple(similarity.shape)}")
    keys = torch.arange(n, device=similarity.device) if caption_keys is None else caption_keys
    targets = clip_targets(keys, keys, similarity.dtype)
    logits = similarity / temperature
    return 0.5 * (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets))


def hard_negatives(similarity: torch.Tensor, generator: torch.Generator | None = None,
                   caption_keys: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(negative text of each image, its validity, negative image of each text, its validity), each (B,).

    Image i's negative text j is drawn with probability softmax_j(s_i·) restricted to texts that are not its
    positives (another caption key; without keys, j ≠ i); text j's negative image likewise from column j. A row
    with no such candidate gets index i and validity False."""
    n = similarity.shape[0]
    keys = torch.arange(n, device=similarity.device) if caption_keys is None else caption_keys
    positive = keys[:, None] == keys[None, :]

    def draw(scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        weights = torch.softmax(scores.detach().float(), dim=1).masked_fill(positive, 0.0)
        valid = weights.sum(dim=1) > 0
        weights[~valid] = positive[~valid].float()  # any positive: drawn, then left out by ``valid``
        picked = torch.multinomial(weights, 1, generator=generator).squeeze(1)
        return torch.where(valid, picked, torch.arange(n, device=scores.device)), valid

    text_of_image, image_valid = draw(similarity)
    image_of_text, text_valid = draw(similarity.T)
    return text_of_image, image_valid, image_of_text, text_valid
