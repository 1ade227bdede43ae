"""Few-shot speaker identification: a speech → who speaks it, as N-way K-shot episodes.

Protocol. The pool is the speeches of the held-out text (never seen by the tokenizer or in
pre-training). Speakers with at least ``min_lines`` speeches there (max shots + queries) are
eligible; a seeded class-disjoint split (:func:`fewshot.data.splits.split_classes` with
``data.holdout_classes`` and ``data.split_seed``) keeps one part for evaluation and leaves the
other for tuning (adapters), so evaluation speakers are held out from any tuning. Episodes over
the evaluation speakers come from :func:`fewshot.evaluate.runner.run_episodes` (seeded, ± 95% CI).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from sklearn.feature_extraction.text import TfidfVectorizer
from tokenizers import Tokenizer

from fewshot.config import EvalConfig
from fewshot.data.splits import split_classes
from fewshot.data.tokenizer import encode
from fewshot.errors import DataError
from fewshot.evaluate.runner import episode_table
from fewshot.models.language import TextTransformer


@dataclass
class SpeakerPool:
    """Evaluation speeches: ``texts[i]`` is spoken by ``speakers[labels[i]]``."""

    texts: list[str]
    labels: np.ndarray
    speakers: list[str]
    tuning_speakers: list[str]


def speaker_pool(pairs: list[tuple[str, str]], min_lines: int, holdout: float, seed: int) -> SpeakerPool:
    """The evaluation side of a seeded class-disjoint split of the speakers with ≥ ``min_lines`` speeches."""
    counts = Counter(speaker for speaker, _ in pairs)
    eligible = sorted(s for s, n in counts.items() if n >= min_lines)
    if len(eligible) < 2:
        raise DataError(f"only {len(eligible)} speaker(s) have ≥ {min_lines} speeches in the held-out text; "
                        "lower eval.shots / eval.queries or raise data.heldout_fraction")
    tune_idx, eval_idx = split_classes(len(eligible), int(holdout) if holdout >= 1 else holdout, seed)
    speakers = [eligible[i] for i in eval_idx]
    index = {s: k for k, s in enumerate(speakers)}
    chosen = [(index[s], text) for s, text in pairs if s in index]
    return SpeakerPool(
        texts=[t for _, t in chosen],
        labels=np.array([k for k, _ in chosen], dtype=np.int64),
        speakers=speakers,
        tuning_speakers=[eligible[i] for i in tune_idx],
    )


def bag_of_words(train_texts: list[str], texts: list[str]) -> np.ndarray:
    """TF-IDF word features (sublinear tf, words seen in ≥ 2 training speeches) fitted on ``train_texts`` only."""
    vectorizer = TfidfVectorizer(sublinear_tf=True, min_df=2).fit(train_texts)
    return vectorizer.transform(texts).toarray().astype(np.float32)


class TokenizedTexts(nn.Module):
    """A text tower behind the face every adapter and the episode runner use: texts → r (N, dim),
    with gradients. ``model`` is the run's tower (``model.embed(tokens, pool)``), ``tokenizer`` its BPE.

    Texts longer than the model's context keep their first ``max_len − 1`` tokens. The texts are
    batched only with texts of the same token length: no padding, and each r is exactly what the
    text alone would give.
    """

    def __init__(self, model: TextTransformer, tokenizer: Tokenizer, pool: str | None = None, batch_size: int = 64) -> None:
        super().__init__()
        self.model, self.tokenizer, self.pool, self.batch_size = model, tokenizer, pool, batch_size
        self.dim = model.dim

    def forward(self, texts: list[str]) -> torch.Tensor:
        if not texts:
            raise DataError("no texts to embed")
        ids = [encode(self.tokenizer, t)[: self.model.max_len - 1] for t in texts]
        if any(len(i) == 0 for i in ids):
            raise DataError("cannot embed an empty text")
        device = next(self.model.parameters()).device
        by_length: dict[int, list[int]] = {}
        for i, seq in enumerate(ids):
            by_length.setdefault(len(seq), []).append(i)
        rows, outs = [], []
        for group in by_length.values():
            for b in range(0, len(group), self.batch_size):
                chunk = group[b : b + self.batch_size]
                outs.append(self.model.embed(torch.tensor([ids[i] for i in chunk], dtype=torch.long, device=device), self.pool))
                rows += chunk
        order = torch.empty(len(rows), dtype=torch.long)
        order[torch.tensor(rows)] = torch.arange(len(rows))
        return torch.cat(outs)[order.to(device)].float()


@torch.no_grad()
def embed_texts(
    model: TextTransformer, tokenizer: Tokenizer, texts: list[str], pool: str | None = None, batch_size: int = 64
) -> torch.Tensor:
    """r = model.embed(tokens, pool) for every text, (N, dim) float32 on the CPU, in eval mode."""
    was_training = model.training
    model.eval()
    out = TokenizedTexts(model, tokenizer, pool, batch_size)(texts).cpu()
    model.train(was_training)
    return out


def speaker_episodes(features: dict[str, np.ndarray | torch.Tensor], labels: np.ndarray, ev: EvalConfig) -> list[dict[str, Any]]:
    """Rows ``{"encoder", "classifier", "way", "shot", ...}`` for every feature set on the same seeded episodes."""
    return [row for name, feats in features.items() for row in episode_table(feats, labels, ev, name)]
