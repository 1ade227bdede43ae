"""Zero-shot classification: prompt prototypes against a loop, top-1 and per-class recall against a count,
the classifier as an episode-runner row, one-line errors for bad templates and class names, and the
CLIP method's towers behind a tokenizer."""

import math

import numpy as np
import pytest
import torch

from fewshot.errors import ConfigError, DataError
from fewshot.evaluate.episodes import EpisodeSampler
from fewshot.evaluate.zeroshot import ZeroShotClassifier, prompts, text_prototypes, zero_shot_episodes, zero_shot_scores

CLASSES = ["red circle", "blue square", "green star", "red square"]
TEMPLATES = ["a photo of a {}.", "a {}", "there is one {} in the scene"]


def fake_text_tower(dim=6):
    """A deterministic text → embedding table with very different norms per text (so averaging before
    normalising would weight prompts unequally)."""
    def embed(texts):
        rows = []
        for text in texts:
            g = torch.Generator().manual_seed(sum(ord(c) * (i + 1) for i, c in enumerate(text)))
            rows.append(torch.randn(dim, generator=g, dtype=torch.float64) * (1 + len(text) % 7) ** 2)
        return torch.stack(rows)
    return embed


def test_prototypes_are_the_renormalised_mean_of_normalised_prompt_embeddings():
    embed = fake_text_tower()
    got = text_prototypes(embed, CLASSES, TEMPLATES)
    for c, name in enumerate(CLASSES):
        vectors = [embed([t.replace("{}", name)])[0].tolist() for t in TEMPLATES]
        unit = [[x / math.sqrt(sum(y * y for y in v)) for x in v] for v in vectors]
        mean = [sum(u[d] for u in unit) / len(unit) for d in range(len(unit[0]))]
        norm = math.sqrt(sum(x * x for x in mean))
        assert got[c].tolist() == pytest.approx([x / norm for x in mean], rel=1e-12)
    # Negative control: the mean of the raw embeddings (normalised once, at the end) is another direction.
    raw = torch.nn.functional.normalize(embed([p for p in prompts(CLASSES, TEMPLATES)[0]]).mean(0), dim=0)
    assert not torch.allclose(raw, got[0], atol=1e-3)


def test_accuracy_and_mean_per_class_recall_equal_a_count():
    rng = np.random.default_rng(0)
    prototypes = torch.nn.functional.normalize(torch.randn(4, 6, dtype=torch.float64), dim=1)
    labels = np.array([0] * 30 + [1] * 10 + [2] * 5 + [3] * 5)  # imbalanced: accuracy ≠ mean recall
    features = prototypes[labels].numpy() + rng.normal(0, 0.6, (len(labels), 6))
    got = zero_shot_scores(features, labels, prototypes)
    predicted = np.argmax(features / np.linalg.norm(features, axis=1, keepdims=True) @ prototypes.numpy().T, axis=1)
    correct = predicted == labels
    recalls = [correct[labels == c].mean() for c in range(4)]
    assert got["accuracy"] == pytest.approx(correct.mean()) and got["mean_recall"] == pytest.approx(np.mean(recalls))
    assert got["ci95"] == pytest.approx(1.96 * correct.std(ddof=1) / math.sqrt(len(labels)))
    assert got["mean_recall_ci95"] == pytest.approx(1.96 * np.std(recalls, ddof=1) / 2)
    assert got["accuracy"] != pytest.approx(got["mean_recall"]) and (got["images"], got["classes"]) == (50, 4)


def test_zero_shot_is_a_row_of_the_episode_runner():
    rng = np.random.default_rng(1)
    prototypes = torch.nn.functional.normalize(torch.randn(8, 6, dtype=torch.float64), dim=1)
    labels = np.repeat(np.arange(8), 20)
    features = prototypes[labels].numpy() + rng.normal(0, 0.8, (len(labels), 6))
    row = zero_shot_episodes(features, labels, prototypes, way=5, query=15, episodes=40, seed=3)
    # By hand: the same seeded 1-shot episodes, each query to the nearest of its episode's 5 prototypes.
    accuracies = []
    for episode in EpisodeSampler(labels, 5, 1, 15, 3).episodes(40):
        classes = labels[episode.support]
        scores = features[episode.query] @ prototypes.numpy()[classes].T
        accuracies.append(np.mean(np.argmax(scores, axis=1) == episode.query_labels))
    assert row["accuracy"] == pytest.approx(np.mean(accuracies)) and row["shot"] == 0 and row["episodes"] == 40
    # An episode among 5 prototypes is easier than all 8: the restriction to the episode's classes is real.
    assert row["accuracy"] > zero_shot_scores(features, labels, prototypes)["accuracy"]
    # The classifier shape: fit checks the feature size, predict gives labels 0..k-1 of the chosen classes.
    classifier = ZeroShotClassifier(prototypes, classes=[5, 2]).fit(features[:3], [0, 1, 0])
    assert set(classifier.predict(features)) <= {0, 1}


@pytest.mark.parametrize("names, templates, needle", [
    (CLASSES, ["a photo of a thing"], r"prompt template 'a photo of a thing' has no '\{\}'"),
    (["red circle", "blue square", "red circle"], TEMPLATES, r"class names must be distinct; repeated: red circle"),
    ([], TEMPLATES, r"needs class names and prompt templates"),
])
def test_bad_prompts_are_one_line_errors(names, templates, needle):
    with pytest.raises(ConfigError, match=needle) as err:
        prompts(names, templates)
    assert "\n" not in str(err.value)


def test_the_clip_method_classifies_through_its_text_tower():
    from fewshot.config import load_config
    from fewshot.data.token_ids import PAD_ID
    from fewshot.data.tokenizer import encode, train_tokenizer
    from fewshot.methods import build_method

    tokenizer = train_tokenizer("a photo of a red circle. a blue square. a green star.\n" * 20, 300)
    method = build_method(load_config(overrides=[
        "method=clip", "data.source=text", "data.image_size=16", "data.channels=3", "data.seq_len=32", "data.vocab_size=300",
        "encoder.options={width: 8}", "method.embed_dim=8", "method.text={dim: 16, depth: 1, heads: 2}"])).eval()

    def embed(texts):
        ids = [encode(tokenizer, t) for t in texts]
        tokens = torch.full((len(ids), max(map(len, ids))), PAD_ID)
        for row, seq in enumerate(ids):
            tokens[row, : len(seq)] = torch.tensor(seq)
        return method.embed_texts(tokens)

    prototypes = text_prototypes(embed, CLASSES, TEMPLATES)
    one_by_one = torch.stack([text_prototypes(lambda ts: torch.cat([embed([t]) for t in ts]), [c], TEMPLATES)[0] for c in CLASSES])
    torch.testing.assert_close(prototypes, one_by_one, atol=1e-6, rtol=1e-5)  # padding in a batch changes nothing
    with pytest.raises(DataError, match="captions of 40 tokens exceed the text tower's context of 32"):
        method.embed_texts(torch.full((1, 40), 7))
    images = torch.rand(6, 3, 16, 16)
    with torch.no_grad():
        predicted = ZeroShotClassifier(prototypes).predict(method.embed_images(images))
    assert predicted.shape == (6,) and set(predicted) <= set(range(len(CLASSES)))
