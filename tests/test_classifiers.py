"""Prototype classifier against hand computations; the classifier registry."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from sklearn.base import clone
from sklearn.exceptions import NotFittedError

from fewshot.errors import ConfigError
from fewshot.evaluate.classifiers import CLASSIFIERS, PrototypeClassifier, make_classifier


def hand_predict(X_train, y_train, X_test, metric):
    """Nearest class mean with explicit loops (no vectorised linear algebra)."""

    def unit(v):
        n = math.sqrt(sum(float(a) * float(a) for a in v))
        return [float(a) / n for a in v]

    classes = sorted(set(int(c) for c in y_train))
    prototypes = {}
    for c in classes:
        rows = [list(map(float, x)) for x, y in zip(X_train, y_train) if y == c]
        if metric == "cosine":
            rows = [unit(r) for r in rows]
        prototypes[c] = [sum(col) / len(rows) for col in zip(*rows)]
    predictions = []
    for x in X_test:
        x = list(map(float, x))
        best, best_score = None, None
        for c in classes:
            p = prototypes[c]
            if metric == "cosine":
                score = sum(a * b for a, b in zip(unit(x), unit(p)))  # higher is closer
            else:
                score = -math.sqrt(sum((a - b) ** 2 for a, b in zip(x, p)))
            if best_score is None or score > best_score:
                best, best_score = c, score
        predictions.append(best)
    return np.array(predictions), prototypes


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
def test_prototype_classifier_matches_hand_computation(metric):
    rng = np.random.default_rng(0)
    y = np.array([2, 5, 9])[rng.integers(0, 3, size=30)]
    X = rng.normal(size=(30, 4)) + 0.3 * y[:, None]  # offsets so classes differ in norm too
    X_test = rng.normal(size=(40, 4)) * 1.5 + 1.5  # around the class means (0.6 to 2.7)
    clf = PrototypeClassifier(metric).fit(X, y)
    expected, prototypes = hand_predict(X, y, X_test, metric)
    np.testing.assert_array_equal(clf.predict(X_test), expected)
    np.testing.assert_array_equal(clf.classes_, [2, 5, 9])
    for k, c in enumerate(clf.classes_):
        np.testing.assert_allclose(clf.prototypes_[k], prototypes[int(c)], rtol=1e-10)
    # Predictions are not constant, so the comparison above says something.
    assert len(set(expected.tolist())) == 3


def test_cosine_and_euclidean_disagree_where_they_should():
    X = np.array([[10.0, 0.0], [1.0, 1.0]])
    y = np.array([0, 1])
    q = np.array([[2.0, 0.1]])  # nearly parallel to class 0, but nearer to class 1's point
    assert PrototypeClassifier("cosine").fit(X, y).predict(q).tolist() == [0]
    assert PrototypeClassifier("euclidean").fit(X, y).predict(q).tolist() == [1]


def test_cosine_normalises_before_averaging():
    # Class 0: one huge vector along x and one small along y. Averaged raw, its mean points
    # along x; averaged after normalising, it points at 45 degrees.
    X = np.array([[100.0, 0.0], [0.0, 1.0], [1.0, 0.2]])
    y = np.array([0, 0, 1])
    q = np.array([[0.3, 1.0]])  # at 73 degrees: nearer 45 (class 0) than 11 (class 1)
    assert PrototypeClassifier("cosine").fit(X, y).predict(q).tolist() == [0]


def test_prototype_classifier_accepts_tensors_and_float32():
    X = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0]], dtype=torch.float32)
    y = torch.tensor([4, 4, 7])
    clf = PrototypeClassifier("euclidean").fit(X, y)
    assert clf.predict(torch.tensor([[0.1, 0.8]])).tolist() == [7]


def test_unknown_metric_is_refused_at_construction_with_the_options():
    with pytest.raises(ConfigError) as info:
        PrototypeClassifier("manhattan")
    assert "cosine" in str(info.value) and "euclidean" in str(info.value)


def test_predict_checks_fitted_and_feature_size():
    with pytest.raises(NotFittedError):
        PrototypeClassifier().predict(np.zeros((1, 3)))
    clf = PrototypeClassifier().fit(np.eye(3), [0, 1, 2])
    with pytest.raises(ValueError, match="4 features.*fitted on 3"):
        clf.predict(np.zeros((1, 4)))


def test_prototype_classifier_is_a_proper_estimator():
    clf = PrototypeClassifier("euclidean")
    assert clf.get_params() == {"metric": "euclidean"}
    copy = clone(clf)
    assert copy.metric == "euclidean" and not hasattr(copy, "prototypes_")
    X = np.array([[0.0], [1.0], [10.0], [11.0]])
    assert clf.fit(X, [0, 0, 1, 1]).score(X, [0, 0, 1, 1]) == 1.0


# --- registry --------------------------------------------------------------------------------


def test_registry_names():
    assert CLASSIFIERS == ("proto-cosine", "proto-euclidean", "logreg", "knn")


@pytest.mark.parametrize("name", CLASSIFIERS)
def test_each_registered_classifier_separates_clusters(name):
    rng = np.random.default_rng(1)
    centers = rng.normal(size=(4, 8)) * 5
    y = np.repeat(np.arange(4), 5)
    X = centers[y] + 0.1 * rng.normal(size=(20, 8))
    yq = np.repeat(np.arange(4), 10)
    Xq = centers[yq] + 0.1 * rng.normal(size=(40, 8))
    a, b = make_classifier(name), make_classifier(name)
    assert a is not b  # a fresh estimator each time
    np.testing.assert_array_equal(a.fit(X, y).predict(Xq), yq)


def test_unknown_classifier_lists_the_names():
    with pytest.raises(ConfigError) as info:
        make_classifier("svm")
    for name in CLASSIFIERS:
        assert name in str(info.value)


def test_knn_is_one_nearest_neighbour():
    # Class 0 has the single nearest point; class 1 has the next two. 3-NN would say 1.
    X = np.array([[1.0, 0.0], [1.0, 0.3], [1.0, -0.3]])
    y = np.array([0, 1, 1])
    assert make_classifier("knn").fit(X, y).predict([[1.0, 0.05]]).tolist() == [0]


def test_knn_uses_the_cosine_metric():
    X = np.array([[10.0, 0.0], [1.0, 1.0]])
    y = np.array([0, 1])
    assert make_classifier("knn").fit(X, y).predict([[2.0, 0.1]]).tolist() == [0]


def test_logreg_ignores_the_scale_of_each_example():
    # On L2-normalised features, multiplying a row by a positive number changes nothing.
    rng = np.random.default_rng(2)
    X = rng.normal(size=(30, 5)) + 1.0
    y = rng.integers(0, 3, size=30)
    Xq = rng.normal(size=(200, 5)) + 1.0
    model = make_classifier("logreg").fit(X, y)
    scaled = make_classifier("logreg").fit(X * rng.uniform(0.01, 100, size=(30, 1)), y)
    np.testing.assert_array_equal(
        model.predict(Xq), scaled.predict(Xq * rng.uniform(0.01, 100, size=(200, 1)))
    )
