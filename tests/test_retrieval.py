"""Retrieval R@K and median rank against a brute-force sort (ties, several captions per image, semantic
relevance); a constant encoder scores no better than chance, where ties in its favour would give 100%."""

import numpy as np
import pytest
import torch

from fewshot.errors import DataError
from fewshot.evaluate.retrieval import ranks, retrieval_rows

IMAGES, CAPTIONS_PER_IMAGE, D = 20, 5, 4


def brute_force_rank(scores, relevant):
    """Sort the gallery by score, an irrelevant item before a relevant one on a tie; the first relevant position, 1-based."""
    order = sorted(range(len(scores)), key=lambda g: (-scores[g], bool(relevant[g])))
    return 1 + next(p for p, g in enumerate(order) if relevant[g])


def brute_force_rows(images, texts, relevance):
    images = images / np.linalg.norm(images, axis=1, keepdims=True)
    texts = texts / np.linalg.norm(texts, axis=1, keepdims=True)
    s = texts @ images.T
    rows = []
    for scores, rel in ((s.T, relevance.T), (s, relevance)):
        r = np.array([brute_force_rank(list(scores[q]), list(rel[q])) for q in range(len(scores))])
        rows.append({**{f"R@{k}": float(np.mean(r <= k)) for k in (1, 5, 10)}, "median_rank": float(np.median(r))})
    return rows


def _tied_embeddings(seed=0):
    """±1 embeddings (every norm 2, so cosines are exact multiples of 1/4: many exact ties), images 3 and 4
    identical, 5 captions per image, each its image with some signs flipped."""
    rng = np.random.default_rng(seed)
    images = rng.choice([-1.0, 1.0], (IMAGES, D))
    images[4] = images[3]
    owner = np.repeat(np.arange(IMAGES), CAPTIONS_PER_IMAGE)
    texts = images[owner] * np.where(rng.random((len(owner), D)) < 0.2, -1.0, 1.0)
    return images, texts, owner


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_instance_retrieval_equals_a_brute_force_sort(seed):
    images, texts, owner = _tied_embeddings(seed)
    got = retrieval_rows(torch.tensor(images), torch.tensor(texts), caption_image=owner)
    relevance = owner[:, None] == np.arange(IMAGES)[None, :]
    for row, want in zip(got, brute_force_rows(images, texts, relevance)):
        assert {k: row[k] for k in want} == pytest.approx(want)
    assert [r["direction"] for r in got] == ["image_to_text", "text_to_image"] and got[0]["queries"] == IMAGES
    assert got[1]["queries"] == IMAGES * CAPTIONS_PER_IMAGE


def test_semantic_retrieval_counts_every_image_a_caption_is_true_of():
    images, texts, owner = _tied_embeddings(3)
    rng = np.random.default_rng(5)
    relevance = (owner[:, None] == np.arange(IMAGES)[None, :]) | (rng.random((len(owner), IMAGES)) < 0.1)
    got = retrieval_rows(torch.tensor(images), torch.tensor(texts), relevance=torch.tensor(relevance))
    for row, want in zip(got, brute_force_rows(images, texts, relevance)):
        assert {k: row[k] for k in want} == pytest.approx(want) and row["relevance"] == "semantic"
    instance = retrieval_rows(torch.tensor(images), torch.tensor(texts), caption_image=owner)
    assert got[1]["R@1"] >= instance[1]["R@1"]  # more relevant images can only help


def test_a_constant_encoder_scores_no_better_than_chance():
    images, texts = torch.ones(IMAGES, D), torch.ones(IMAGES * CAPTIONS_PER_IMAGE, D)
    owner = torch.arange(IMAGES).repeat_interleave(CAPTIONS_PER_IMAGE)
    for row in retrieval_rows(images, texts, caption_image=owner):
        chance = (CAPTIONS_PER_IMAGE if row["direction"] == "image_to_text" else 1) / len(texts if row["direction"] == "image_to_text" else images)
        assert row["R@1"] <= chance and row["R@10"] < 1.0
    # Negative control: ties in the model's favour (rank = 1 + items scoring strictly higher) give a perfect score.
    scores = texts @ images.T
    relevant = torch.nn.functional.one_hot(owner, IMAGES).bool()
    best = scores.masked_fill(~relevant, float("-inf")).amax(dim=1, keepdim=True)
    favourable = 1 + ((scores > best) & ~relevant).sum(dim=1)
    assert (favourable == 1).all() and (ranks(scores, relevant) == IMAGES).all()


def test_a_random_encoder_scores_about_chance():
    g = torch.Generator().manual_seed(0)
    images, texts = torch.randn(200, 16, generator=g), torch.randn(200, 16, generator=g)
    row = retrieval_rows(images, texts, caption_image=torch.arange(200))[1]
    assert abs(row["R@10"] - 10 / 200) < 0.04 and 60 < row["median_rank"] < 140


def test_a_query_without_a_relevant_item_is_refused():
    with pytest.raises(DataError, match="1 of 3 queries have no relevant item"):
        retrieval_rows(torch.eye(3), torch.eye(3), relevance=torch.tensor([[1, 0, 0], [0, 1, 0], [0, 0, 0]]).bool())
