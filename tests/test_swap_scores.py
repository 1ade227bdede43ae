"""The binding / relation swap test's scorer against a brute-force loop; ties count against the model, so a
constant encoder scores 0 (ties in its favour would give 100%), and a text tower that only sees a bag of words
cannot tell a scene's true caption from its swapped twin (they tie); a random encoder is near chance, 50%."""

import math

import numpy as np
import pytest
import torch

from fewshot.data.scenes import swap_test
from fewshot.errors import DataError
from fewshot.evaluate.zeroshot import swap_scores


def brute_force(images, true, swapped):
    """One image at a time, cosines written out; strictly greater wins."""
    def cos(a, b):
        return sum(x * y for x, y in zip(a, b)) / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))
    return [1.0 if cos(x, t) > cos(x, s) else 0.0 for x, t, s in zip(images.tolist(), true.tolist(), swapped.tolist())]


def test_swap_scores_equal_a_loop_with_ties_and_unequal_norms():
    g = torch.Generator().manual_seed(0)
    images = torch.randn(40, 5, generator=g, dtype=torch.float64)
    true = torch.randn(40, 5, generator=g, dtype=torch.float64) * torch.rand(40, 1, generator=g, dtype=torch.float64) * 10
    swapped = torch.randn(40, 5, generator=g, dtype=torch.float64)
    swapped[:8] = true[:8]  # planted exact ties
    expected = brute_force(images, true, swapped)
    assert expected[:8] == [0.0] * 8 and 0 < sum(expected) < 32
    got = swap_scores(images, true, swapped)
    assert got["accuracy"] == pytest.approx(float(np.mean(expected)), abs=1e-12) and got["images"] == 40
    assert got["ci95"] == pytest.approx(1.96 * np.std(expected, ddof=1) / math.sqrt(40), rel=1e-12)


@pytest.mark.parametrize("ties", ["against the model", "broken: for the model"])
def test_a_constant_encoder_scores_zero_not_one_hundred(ties):
    images, texts = torch.ones(30, 4), torch.ones(30, 4)
    accuracy = swap_scores(images, texts, texts.clone())["accuracy"]
    if ties == "against the model":
        assert accuracy == 0.0
    else:  # Negative control: counting a tie as right (>=) scores the constant encoder perfectly.
        favourable = ((images * texts).sum(1) >= (images * texts).sum(1)).double().mean().item()
        assert favourable == 1.0 and accuracy != favourable


@pytest.mark.parametrize("kind", ["binding", "relation"])
def test_a_bag_of_words_text_tower_cannot_pass_a_swap_test(kind):
    """The swapped twin has the same words in another order: an order-blind tower embeds both alike (a tie, a
    loss); a tower that reads word order can pass (here one that weights each word by its position)."""
    test = swap_test(kind, 30, 32, seed=0)
    words = sorted({w for pair in test.captions for c in pair for w in c.split()})
    # integer entries: a sum of them is exact in any order, so equal bags give bit-equal embeddings
    table = torch.randint(-9, 10, (len(words), 8), generator=torch.Generator().manual_seed(1)).double()

    def bag(texts, ordered=False):
        return torch.stack([sum(table[words.index(w)] * ((p + 1) if ordered else 1) for p, w in enumerate(t.split())) for t in texts])

    assert all(sorted(t.split()) == sorted(s.split()) and t != s for t, s in test.captions)
    images = torch.randn(30, 8, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    true, swapped = [p[0] for p in test.captions], [p[1] for p in test.captions]
    assert swap_scores(images, bag(true), bag(swapped))["accuracy"] == 0.0
    # The order-aware tower with its true-caption embeddings as the images' is right on every scene.
    assert swap_scores(bag(true, True), bag(true, True), bag(swapped, True))["accuracy"] == 1.0


def test_a_random_encoder_is_near_chance():
    g = torch.Generator().manual_seed(3)
    got = swap_scores(torch.randn(4000, 16, generator=g), torch.randn(4000, 16, generator=g), torch.randn(4000, 16, generator=g))
    assert abs(got["accuracy"] - 0.5) < 3 * got["ci95"]


def test_mismatched_shapes_are_a_one_line_error():
    with pytest.raises(DataError, match=r"one true and one swapped caption embedding per image.*\(5, 4\).*\(4, 4\)"):
        swap_scores(torch.ones(5, 4), torch.ones(4, 4), torch.ones(5, 4))
