"""Zero-shot classification from class names and prompt templates (Radford et al. 2021, §3.1.4).

Each class c gets a text prototype from its prompts, "a photo of a {}." → "a photo of a red
circle.": the mean of the ℓ2-normalised text embeddings of its M prompts, normalised again,

    w_c = normalise( (1/M) Σ_m normalise(text(template_m(name_c))) ),

and an image goes to the class whose prototype has the highest cosine similarity with its image
embedding (CLIP's prompt ensembling, open_clip's ``build_zero_shot_classifier``). Reported: top-1
accuracy (± 95% CI over images) and the mean per-class recall (± 95% CI over classes), both with
:func:`fewshot.evaluate.runner.mean_ci95`. :class:`ZeroShotClassifier` has the fit/predict shape of
the episode runner's classifiers, so zero-shot is one more row next to few-shot episodes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from fewshot.errors import ConfigError, DataError
from fewshot.evaluate.episodes import Episode, EpisodeSampler, as_feature_matrix, as_label_vector
from fewshot.evaluate.runner import fit_predict_episodes, mean_ci95

__all__ = ["ZeroShotClassifier", "prompts", "swap_scores", "text_prototypes", "zero_shot_episodes", "zero_shot_scores"]


def prompts(class_names: Sequence[str], templates: Sequence[str]) -> list[list[str]]:
    """The prompt texts of every class: ``[[template.format(name) for template in templates] for name in class_names]``."""
    names, templates = list(class_names), list(templates)
    if not names or not templates:
        raise ConfigError(f"zero-shot needs class names and prompt templates, got {len(names)} names and {len(templates)} templates")
    for template in templates:
        if not isinstance(template, str) or "{}" not in template:
            raise ConfigError(f"prompt template {template!r} has no '{{}}' where the class name goes (e.g. 'a photo of a {{}}.')")
    seen: set[str] = set()
    repeated = [n for n in names if n in seen or seen.add(n)]
    if repeated:
        raise ConfigError(f"class names must be distinct; repeated: {', '.join(sorted(set(repeated)))}")
    return [[template.replace("{}", name) for template in templates] for name in names]


def text_prototypes(embed_texts: Callable[[list[str]], torch.Tensor], class_names: Sequence[str], templates: Sequence[str]) -> torch.Tensor:
    """(C, D) unit-norm class prototypes: each class's normalised prompt embeddings averaged, renormalised.

    embed_texts: texts → (n, D) embeddings (a CLIP text tower and projection behind its tokenizer).
    """
    texts = prompts(class_names, templates)
    flat = [t for per_class in texts for t in per_class]
    with torch.no_grad():
        embedded = F.normalize(torch.as_tensor(embed_texts(flat)).detach().double().cpu(), dim=1)
    if embedded.shape[0] != len(flat):
        raise DataError(f"embed_texts gave {embedded.shape[0]} embeddings for {len(flat)} prompts")
    return F.normalize(embedded.reshape(len(texts), len(texts[0]), -1).mean(dim=1), dim=1)


class ZeroShotClassifier:
    """Nearest text prototype by cosine similarity, shaped like the episode runner's classifiers.

    ``prototypes``: (C, D) class prototypes; ``classes``: which of them the labels 0..k−1 name (an
    episode's classes, in its order), all C by default. ``fit`` learns nothing from the support (that
    is what zero-shot means): it only checks the feature size. ``predict`` gives labels in 0..k−1.
    ``normalize_prototypes=False`` scores x̂ · w_c with the prototypes as given: with w_c the mean of
    unit text embeddings that is the mean cosine over the class's texts (classification by description).
    """

    def __init__(self, prototypes: torch.Tensor | np.ndarray, classes: Sequence[int] | None = None,
                 normalize_prototypes: bool = True) -> None:
        self.prototypes, self.classes, self.normalize_prototypes = prototypes, classes, normalize_prototypes

    def fit(self, X: Any = None, y: Any = None) -> "ZeroShotClassifier":
        prototypes = as_feature_matrix(self.prototypes, "prototypes")
        chosen = np.arange(len(prototypes)) if self.classes is None else np.asarray(self.classes, dtype=np.int64)
        if chosen.ndim != 1 or chosen.size == 0 or chosen.min() < 0 or chosen.max() >= len(prototypes):
            raise DataError(f"classes must index the {len(prototypes)} prototypes, got {self.classes!r}")
        weights = prototypes[chosen]
        self.prototypes_ = weights / np.maximum(np.linalg.norm(weights, axis=1, keepdims=True), 1e-12) if self.normalize_prototypes else weights
        self.n_features_in_ = weights.shape[1]
        if X is not None and as_feature_matrix(X, "X").shape[1] != self.n_features_in_:
            raise DataError(f"X has {np.asarray(X).shape[1]} features, the prototypes {self.n_features_in_}")
        return self

    def decision_function(self, X: Any) -> np.ndarray:
        """Cosine similarity of each row of X with each prototype, (n, k)."""
        if not hasattr(self, "prototypes_"):
            self.fit()
        X = as_feature_matrix(X, "X")
        if X.shape[1] != self.n_features_in_:
            raise DataError(f"X has {X.shape[1]} features, the prototypes {self.n_features_in_}")
        return (X / np.maximum(np.linalg.norm(X, axis=1, keepdims=True), 1e-12)) @ self.prototypes_.T

    def predict(self, X: Any) -> np.ndarray:
        return np.argmax(self.decision_function(X), axis=1)


def zero_shot_scores(image_embeddings: Any, labels: Any, prototypes: Any, normalize_prototypes: bool = True) -> dict[str, Any]:
    """``{"accuracy", "ci95", "mean_recall", "mean_recall_ci95", "images", "classes"}`` of
    :class:`ZeroShotClassifier` on every image; labels index the prototypes. The recall is averaged
    over the classes present in ``labels``; fractions, not percentages."""
    features = as_feature_matrix(image_embeddings, "image embeddings")
    labels = as_label_vector(labels, features.shape[0])
    classifier = ZeroShotClassifier(prototypes, normalize_prototypes=normalize_prototypes).fit(features)
    if labels.max() >= len(classifier.prototypes_):
        raise DataError(f"labels reach {labels.max()}, but there are {len(classifier.prototypes_)} prototypes")
    predicted = classifier.predict(features)
    correct = (predicted == labels).astype(np.float64)
    accuracy, ci95 = mean_ci95(correct)
    present = np.unique(labels)
    recall, recall_ci95 = mean_ci95([correct[labels == c].mean() for c in present])
    return {"accuracy": accuracy, "ci95": ci95, "mean_recall": recall, "mean_recall_ci95": recall_ci95,
            "images": int(len(labels)), "classes": int(len(present))}


def zero_shot_episodes(image_embeddings: Any, labels: Any, prototypes: Any, way: int, query: int = 15,
                       episodes: int = 600, seed: int = 0, normalize_prototypes: bool = True) -> dict[str, Any]:
    """Zero-shot as a row of the episode runner: the same seeded episodes as the 1-shot rows (the
    support is drawn and ignored), each query classified among its episode's ``way`` prototypes.
    Returns ``{"classifier": "zero-shot", "way", "shot": 0, "query", "episodes", "accuracy", "ci95"}``."""
    features = as_feature_matrix(image_embeddings, "image embeddings")
    labels = as_label_vector(labels, features.shape[0])
    drawn: list[Episode] = list(EpisodeSampler(labels, way, 1, query, seed).episodes(episodes))
    # The episode's class j is labels[support[j]] (1 shot: support row j is class j's).
    accuracies = fit_predict_episodes(lambda i: ZeroShotClassifier(prototypes, labels[drawn[i].support], normalize_prototypes),
                                      features, drawn)[0]
    accuracy, ci95 = mean_ci95(accuracies)
    return {"classifier": "zero-shot", "way": way, "shot": 0, "query": query, "episodes": len(drawn), "accuracy": accuracy, "ci95": ci95}


def swap_scores(image_embeddings: Any, true_texts: Any, swapped_texts: Any) -> dict[str, Any]:
    """A two-way test per image (binding or relation swaps, :func:`fewshot.data.scenes.swap_test`): image i is
    right when its true caption is closer than the same words swapped,

        correct_i = [ cos(x_i, t_i) > cos(x_i, s_i) ],

    strictly, so a tie counts against the model (a constant encoder scores 0, not 100%); a model that cannot
    tell the two apart is at chance, 50%. Returns ``{"accuracy", "ci95", "images"}`` (fractions; the CI by
    :func:`fewshot.evaluate.runner.mean_ci95` over images)."""
    x = as_feature_matrix(image_embeddings, "image embeddings")
    t, s = as_feature_matrix(true_texts, "true caption embeddings"), as_feature_matrix(swapped_texts, "swapped caption embeddings")
    if not (x.shape == t.shape == s.shape):
        raise DataError(f"a swap test needs one true and one swapped caption embedding per image, of the images' size; got images "
                        f"{x.shape}, true {t.shape}, swapped {s.shape}")

    def unit(m: np.ndarray) -> np.ndarray:
        return m / np.maximum(np.linalg.norm(m, axis=1, keepdims=True), 1e-12)

    x, t, s = unit(x), unit(t), unit(s)
    correct = ((x * t).sum(axis=1) > (x * s).sum(axis=1)).astype(np.float64)
    accuracy, ci95 = mean_ci95(correct)
    return {"accuracy": accuracy, "ci95": ci95, "images": int(len(correct))}
