"""Classifiers fitted on an episode's support set, shaped like scikit-learn estimators.

The constructor only stores parameters; ``fit(X, y)`` validates the data and sets the
trailing-underscore attributes; ``predict(X)`` checks that the estimator is fitted and that
``X`` has the feature size seen in ``fit``.

Registry (:func:`make_classifier`, names in :data:`CLASSIFIERS`):

``proto-cosine``
    Nearest class mean by cosine similarity: features are L2-normalised, averaged per class,
    and each query goes to the prototype with the highest cosine similarity (ProtoNet-style
    nearest centroid, as in Chen et al. 2019's Baseline++ / Gidaris & Komodakis 2018).
``proto-euclidean``
    Nearest class mean by Euclidean distance on the raw features (Snell et al. 2017).
``logreg``
    scikit-learn ``LogisticRegression`` on L2-normalised features: C = 1.0 (scikit-learn's
    default, as used by Tian et al. 2020 "Rethinking few-shot image classification"), lbfgs,
    multinomial loss, ``max_iter=1000`` (small episodes converge in a few dozen iterations).
``knn``
    scikit-learn ``KNeighborsClassifier`` with k = 1 and the cosine metric (the same neighbours
    as Euclidean distance on L2-normalised features): 1-nearest-neighbour is the standard few-shot k-NN baseline (with 1 shot, any
    larger k would vote across classes with one example each).
"""

from __future__ import annotations

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.exceptions import NotFittedError
from sklearn.linear_model import LogisticRegression
from sklearn.neighbors import KNeighborsClassifier
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import Normalizer

from fewshot.errors import ConfigError, DataError
from fewshot.evaluate.episodes import as_feature_matrix, as_label_vector

__all__ = [
    "CLASSIFIERS",
    "LOGREG_C",
    "LOGREG_MAX_ITER",
    "METRICS",
    "NearestByDistance",
    "PrototypeClassifier",
    "l2_normalize",
    "make_classifier",
]

METRICS = ("cosine", "euclidean")
CLASSIFIERS = ("proto-cosine", "proto-euclidean", "logreg", "knn")
LOGREG_C = 1.0
LOGREG_MAX_ITER = 1000

_EPS = 1e-12


def l2_normalize(x: np.ndarray) -> np.ndarray:
    """Rows of ``x`` scaled to unit L2 norm (all-zero rows stay zero)."""
    norms = np.linalg.norm(x, axis=-1, keepdims=True)
    return x / np.maximum(norms, _EPS)


def check_metric(metric: str) -> str:
    if metric not in METRICS:
        raise ConfigError(f"unknown metric {metric!r}; choose one of: {', '.join(METRICS)}")
    return metric


class PrototypeClassifier(ClassifierMixin, BaseEstimator):
    """Nearest class mean (ProtoNet / nearest centroid).

    metric="cosine": L2-normalise the features, average them per class, and predict the class
    whose mean has the highest cosine similarity with the (normalised) query.
    metric="euclidean": average the raw features per class and predict the class whose mean is
    nearest in Euclidean distance.
    Ties go to the class that sorts first.

    Fitted attributes: ``classes_`` (sorted labels), ``prototypes_`` (n_classes, D),
    ``n_features_in_``.
    """

    def __init__(self, metric: str = "cosine") -> None:
        check_metric(metric)
        self.metric = metric

    def fit(self, X, y) -> "PrototypeClassifier":
        check_metric(self.metric)
        X = as_feature_matrix(X, "X")
        y = as_label_vector(y, X.shape[0])
        classes, inverse, counts = np.unique(y, return_inverse=True, return_counts=True)
        if self.metric == "cosine":
            X = l2_normalize(X)
        sums = np.zeros((len(classes), X.shape[1]), dtype=np.float64)
        np.add.at(sums, inverse, X)
        self.classes_ = classes
        self.prototypes_ = sums / counts[:, None]
        self.n_features_in_ = X.shape[1]
        return self

    def decision_function(self, X) -> np.ndarray:
        """Scores (n, n_classes), higher is closer: cosine similarity or minus squared distance."""
        if not hasattr(self, "prototypes_"):
            raise NotFittedError("this PrototypeClassifier is not fitted yet; call fit(X, y) first")
        X = as_feature_matrix(X, "X")
        if X.shape[1] != self.n_features_in_:
            raise DataError(
                f"X has {X.shape[1]} features, but the classifier was fitted on {self.n_features_in_}"
            )
        if self.metric == "cosine":
            return l2_normalize(X) @ l2_normalize(self.prototypes_).T
        # -||x - p||^2 = 2 x.p - ||p||^2 - ||x||^2; the last term does not change the argmax.
        sq = (X * X).sum(axis=1, keepdims=True)
        return 2.0 * X @ self.prototypes_.T - (self.prototypes_**2).sum(axis=1) - sq

    def predict(self, X) -> np.ndarray:
        scores = self.decision_function(X)
        return self.classes_[np.argmax(scores, axis=1)]


def make_classifier(name: str):
    """A fresh, unfitted classifier for a registry name (see the module docstring)."""
    if name == "proto-cosine":
        return PrototypeClassifier("cosine")
    if name == "proto-euclidean":
        return PrototypeClassifier("euclidean")
    if name == "logreg":
        return Pipeline(
            [
                ("l2", Normalizer(norm="l2")),
                (
                    "logreg",
                    LogisticRegression(C=LOGREG_C, solver="lbfgs", max_iter=LOGREG_MAX_ITER),
                ),
            ]
        )
    if name == "knn":
        # The cosine metric ignores scale, so L2-normalising first would change nothing.
        return KNeighborsClassifier(n_neighbors=1, metric="cosine", algorithm="brute")
    raise ConfigError(f"unknown classifier {name!r}; choose one of: {', '.join(CLASSIFIERS)}")


class NearestByDistance:
    """1-nearest neighbour under a distance between items that is not a vector metric (Lake's
    modified Hausdorff distance between ink point sets).

    Items are indices into a pool. ``pair_distance(pairs)`` takes (K, 2) index rows (query,
    support) and returns their K distances; each pair is computed once and kept in ``cache``, which
    the caller shares across episodes (and ways × shots), so every distance an evaluation needs is
    computed once. Each query goes to the class of its nearest support item (the first on a tie).
    """

    def __init__(self, pair_distance, cache: dict[tuple[int, int], float] | None = None) -> None:
        self.pair_distance = pair_distance
        self.cache = {} if cache is None else cache

    def fit(self, support, labels) -> "NearestByDistance":
        self.support_ = np.asarray(support, dtype=np.int64)
        self.labels_ = as_label_vector(labels, len(self.support_))
        return self

    def predict(self, query) -> np.ndarray:
        query = np.asarray(query, dtype=np.int64)
        pairs = [(int(q), int(s)) for q in query for s in self.support_]
        missing = list(dict.fromkeys(p for p in pairs if p not in self.cache))
        if missing:
            found = np.asarray(self.pair_distance(np.array(missing, dtype=np.int64)), dtype=np.float64)
            if found.shape != (len(missing),):
                raise DataError(f"pair_distance returned shape {found.shape} for {len(missing)} pairs")
            self.cache.update(zip(missing, found))
        d = np.array([self.cache[p] for p in pairs]).reshape(len(query), len(self.support_))
        return self.labels_[d.argmin(axis=1)]
