"""Image–text retrieval: Recall@K both ways and the median rank, ties counted against the model.

Each query (an image, or a caption) ranks the whole gallery (every caption, or every image) by
cosine similarity. Its rank is where the first relevant item appears when every item scoring at
least as high as the best relevant one comes first:

    rank(q) = 1 + #{g irrelevant to q : s(q, g) ≥ max_{g' relevant to q} s(q, g')}

so a tie with an irrelevant item is a loss (a constant encoder ranks every relevant item last, not
first). R@K = the fraction of queries with rank ≤ K; the median rank is over queries. With
several captions per image (COCO's 5, Flickr30K's 5) image → text counts a hit when any of the
image's captions is in the top K, text → image when the caption's image is (Karpathy & Fei-Fei
2015's protocol, as CLIP's Table 13 reports it).

Relevance is a boolean (captions × images) matrix: the instance variant (caption t is relevant to
the image it was written for, ``caption_image``) or a semantic one (every image the caption is
true of, e.g. from a scene verifier), passed as ``relevance``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from fewshot.errors import DataError

__all__ = ["KS", "ranks", "recall_rows", "retrieval_rows"]

KS = (1, 5, 10)


def ranks(scores: torch.Tensor, relevant: torch.Tensor) -> torch.Tensor:
    """1-based rank of each query's best relevant item, ties against the model.

    scores: (Q, G) similarities, higher = closer. relevant: (Q, G) bool, at least one per row.
    Returns (Q,) int64.
    """
    if scores.ndim != 2 or relevant.shape != scores.shape:
        raise DataError(f"scores (Q, G) and relevance must have one shape, got {tuple(scores.shape)} and {tuple(relevant.shape)}")
    relevant = relevant.to(torch.bool)
    empty = ~relevant.any(dim=1)
    if empty.any():
        raise DataError(f"{int(empty.sum())} of {len(empty)} queries have no relevant item in the gallery; R@K is undefined for them")
    best = scores.masked_fill(~relevant, float("-inf")).amax(dim=1, keepdim=True)  # (Q, 1)
    return 1 + ((scores >= best) & ~relevant).sum(dim=1)


def recall_rows(r: torch.Tensor, ks: Sequence[int] = KS) -> dict[str, Any]:
    """``{"R@K": fraction with rank ≤ K …, "median_rank", "queries"}`` of ranks ``r``."""
    r = r.double()
    row: dict[str, Any] = {f"R@{k}": float((r <= k).double().mean()) for k in ks}
    row["median_rank"] = float(np.median(r.numpy()))
    row["queries"] = int(r.numel())
    return row


def retrieval_rows(
    image_embeddings: torch.Tensor,
    text_embeddings: torch.Tensor,
    caption_image: torch.Tensor | Sequence[int] | None = None,
    relevance: torch.Tensor | None = None,
    ks: Sequence[int] = KS,
) -> list[dict[str, Any]]:
    """Rows ``{"direction": "image_to_text" | "text_to_image", "relevance": "instance" | "semantic",
    "R@1", "R@5", "R@10", "median_rank", "queries"}``.

    image_embeddings: (I, D); text_embeddings: (T, D) (cosine similarity: both are normalised here).
    caption_image: (T,) the index of the image each caption was written for (the instance relevance).
    relevance: (T, I) bool, every image each caption is true of (the semantic relevance), instead.
    """
    if (caption_image is None) == (relevance is None):
        raise DataError("give either caption_image (each caption's own image) or a relevance matrix (captions × images)")
    images = F.normalize(torch.as_tensor(image_embeddings).detach().double().cpu(), dim=1)
    texts = F.normalize(torch.as_tensor(text_embeddings).detach().double().cpu(), dim=1)
    if images.ndim != 2 or texts.ndim != 2 or images.shape[1] != texts.shape[1]:
        raise DataError(f"image and text embeddings must be (I, D) and (T, D), got {tuple(images.shape)} and {tuple(texts.shape)}")
    kind = "semantic" if relevance is not None else "instance"
    if relevance is None:
        owner = torch.as_tensor(caption_image, dtype=torch.long)
        if owner.shape != (texts.shape[0],) or owner.min() < 0 or owner.max() >= images.shape[0]:
            raise DataError(f"caption_image must give each of the {texts.shape[0]} captions an image index in 0..{images.shape[0] - 1}")
        relevance = F.one_hot(owner, images.shape[0]).bool()
    relevance = torch.as_tensor(relevance).bool().cpu()
    if relevance.shape != (texts.shape[0], images.shape[0]):
        raise DataError(f"relevance must be (captions, images) = {(texts.shape[0], images.shape[0])}, got {tuple(relevance.shape)}")
    scores = texts @ images.T  # (T, I)
    return [
        {"direction": "image_to_text", "relevance": kind, **recall_rows(ranks(scores.T, relevance.T), ks)},
        {"direction": "text_to_image", "relevance": kind, **recall_rows(ranks(scores, relevance), ks)},
    ]
