"""Text → image retrieval on fresh scenes, with 95% CIs, for any run with an image side and a text side (``embed_images``
/ ``embed_texts``: CLIP's two towers, FROMAGe's [RET] state against its mapped image embedding), so two runs are
compared on the same candidates.

The test: ``n`` fresh scenes (:func:`fewshot.evaluate.captions.caption_test`, the captioning test's stream), each
scene's first reference caption a query and the ``n`` images the gallery. A query's rank is
:func:`fewshot.evaluate.retrieval.ranks`'s (ties against the model), and

    R@K = (1/Q) Σ_q [rank(q) ≤ K]   ± the 95% CI of that mean over the queries

with two relevances: instance (only the caption's own image) and semantic (also every image the caption is true of,
by the scene verifier; a caption such as "there is one object" is true of many scenes).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from fewshot.evaluate.captions import caption_test
from fewshot.evaluate.image_text import ImageTextRun, _split_seed, scene_relevance
from fewshot.evaluate.retrieval import ranks, recall_rows
from fewshot.evaluate.runner import mean_ci95

__all__ = ["recall_with_ci", "scene_retrieval"]


def recall_with_ci(scores: torch.Tensor, relevant: torch.Tensor, ks: Sequence[int] = (1, 5)) -> dict[str, Any]:
    """``{"R@K", "R@K_ci95" for each K, "median_rank", "queries"}`` of queries × gallery ``scores`` (higher = closer) and
    the bool ``relevant`` of the same shape (at least one per query)."""
    r = ranks(scores, relevant)
    out = recall_rows(r, ks)
    for k in ks:  # each R@K as the mean of the per-query hits, with that mean's 95% CI
        out[f"R@{k}"], out[f"R@{k}_ci95"] = mean_ci95((r <= k).double().tolist())
    return out


@torch.no_grad()
def scene_retrieval(path: str | Path, n: int = 300, seed: int = 0, heldout: bool = False, ks: Sequence[int] = (1, 5),
                    split_seed: int | None = None) -> dict[str, Any]:
    """Text → image R@K ± CI of the run at ``path`` on ``n`` fresh scenes of the seen (``heldout``: held-out) pairs of the
    CoGenT split (the run's pool's, or ``split_seed``). Returns ``{"run_dir", "method", "step", "pairs", "images",
    "truncated_captions", "instance": {...}, "semantic": {...}}`` (each a :func:`recall_with_ci` row)."""
    model = ImageTextRun(path)
    data = model.run.config.data
    split = _split_seed(model.run) if split_seed is None else split_seed
    test = caption_test(n, data.image_size, seed, split, heldout=heldout)
    captions = [references[0] for references in test.references]
    scores = F.normalize(model.texts(captions).double(), dim=1) @ F.normalize(model.images(test.images).double(), dim=1).T
    own = torch.eye(n, dtype=torch.bool)
    semantic = scene_relevance(captions, test.scenes) | own
    return {"run_dir": str(model.run.path), "method": model.run.config.method.name, "step": model.run.step,
            "pairs": "held-out" if heldout else "seen", "images": n, "truncated_captions": model.truncated,
            "instance": recall_with_ci(scores, own, ks), "semantic": recall_with_ci(scores, semantic, ks)}
