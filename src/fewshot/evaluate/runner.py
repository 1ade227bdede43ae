"""Episode evaluation on precomputed features, and Lake et al.'s one-shot runs.

Confidence intervals follow the few-shot literature's convention: the mean accuracy over
episodes plus or minus ``1.96 * std / sqrt(n)`` (a normal-approximation 95% interval for the
mean). We use the sample standard deviation (``ddof=1``); with 600 episodes it differs from the
``ddof=0`` version some papers' code uses by a factor sqrt(600/599), i.e. under 0.1%.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from sklearn import config_context
from threadpoolctl import threadpool_limits

from fewshot.config import EvalConfig
from fewshot.errors import ConfigError, DataError
from fewshot.evaluate.classifiers import (
    CLASSIFIERS,
    PrototypeClassifier,
    check_metric,
    l2_normalize,
    make_classifier,
)
from fewshot.evaluate.episodes import Episode, EpisodeSampler, as_feature_matrix, as_label_vector

__all__ = [
    "above_beyond_ci95", "classifier_row", "episode_table", "fit_predict_episodes", "mean_ci95", "run_episodes", "score_lake_runs",
    "score_lake_runs_by_distance", "take",
]

DEFAULT_CLASSIFIERS = CLASSIFIERS


def mean_ci95(accuracies: Iterable[float]) -> tuple[float, float]:
    """``(mean, half_width)`` with ``half_width = 1.96 * std(ddof=1) / sqrt(n)``.

    With a single value the spread is unknown and the half width is NaN.
    """
    values = np.asarray(list(accuracies), dtype=np.float64).reshape(-1)
    if values.size == 0:
        raise DataError("no accuracies to summarise")
    mean = float(values.mean())
    if values.size == 1:
        return mean, math.nan
    return mean, float(1.96 * values.std(ddof=1) / math.sqrt(values.size))


def above_beyond_ci95(a: Mapping[str, float], b: Mapping[str, float]) -> bool:
    """Whether row ``a`` beats row ``b`` by more than both 95% intervals (rows hold ``accuracy`` and its ``ci95``
    half width): ``a.accuracy − a.ci95 > b.accuracy + b.ci95``, the lower end of a's interval strictly above the
    upper end of b's. Touching or overlapping intervals, and a NaN half width (one value), give False."""
    return bool(a["accuracy"] - a["ci95"] > b["accuracy"] + b["ci95"])


def take(items: Any, idx: np.ndarray) -> Any:
    """Rows ``idx`` of a tensor or array of items (features, images), or of a list (texts)."""
    if isinstance(items, torch.Tensor):
        return items[torch.from_numpy(np.array(idx, dtype=np.int64))]  # a copy: episodes are read-only
    if isinstance(items, np.ndarray):
        return items[idx]
    return [items[int(j)] for j in idx]


def fit_predict_episodes(make: Callable[[int], Any], items: Any, drawn: Sequence[Episode]) -> tuple[list[float], list[float], Any]:
    """The one episode loop for any classifier shaped like an estimator.

    ``make(i)`` gives a fresh classifier for episode ``i``; it is fitted on the support items with
    labels 0..way-1 and predicts the queries. ``items`` are whatever it takes: a feature matrix, an
    image tensor or a list of texts. Returns (accuracy per episode, seconds per episode, the first
    episode's fitted classifier).
    """
    accuracies, seconds, first = [], [], None
    for i, episode in enumerate(drawn):
        start = time.perf_counter()
        model = make(i)
        model.fit(take(items, episode.support), episode.support_labels)
        predicted = np.asarray(model.predict(take(items, episode.query)))
        seconds.append(time.perf_counter() - start)
        accuracies.append(float(np.mean(predicted == episode.query_labels)))
        first = model if first is None else first
    return accuracies, seconds, first


def _check_classifiers(classifiers: Sequence[str] | str) -> tuple[str, ...]:
    if isinstance(classifiers, str):
        classifiers = (classifiers,)
    names = tuple(classifiers)
    if not names:
        raise ConfigError(f"no classifiers given; choose from: {', '.join(CLASSIFIERS)}")
    for name in names:
        make_classifier(name)  # raises ConfigError listing the names
    if len(set(names)) != len(names):
        raise ConfigError(f"classifiers listed twice: {', '.join(names)}")
    return names


def run_episodes(
    features: np.ndarray | torch.Tensor,
    labels: np.ndarray | torch.Tensor,
    way: int,
    shot: int,
    query: int,
    episodes: int = 600,
    classifiers: Sequence[str] = DEFAULT_CLASSIFIERS,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """Mean accuracy and 95% interval of each classifier over the same ``episodes`` episodes.

    Episodes come from :class:`EpisodeSampler` ``(labels, way, shot, query, seed)``, so the same
    seed gives the same episodes for every classifier, every encoder and every machine. One row
    per classifier, in the order given: ``{"classifier", "way", "shot", "query", "episodes",
    "accuracy", "ci95"}`` with accuracy and ci95 as fractions (0.5 = 50%).
    """
    features = as_feature_matrix(features)
    labels = as_label_vector(labels, features.shape[0])
    names = _check_classifiers(classifiers)
    if isinstance(episodes, bool) or not isinstance(episodes, (int, np.integer)) or episodes < 1:
        raise ConfigError(f"episodes must be a positive integer, got {episodes!r}")
    sampler = EpisodeSampler(labels, way, shot, query, seed)
    drawn = list(sampler.episodes(int(episodes)))

    # All support and query rows at once: (E, way*shot) and (E, way*query) index matrices.
    support = np.stack([e.support for e in drawn])
    query_idx = np.stack([e.query for e in drawn])
    support_labels = drawn[0].support_labels  # identical layout in every episode
    query_labels = drawn[0].query_labels

    rows = []
    for name in names:
        if name.startswith("proto-"):
            correct = _prototype_correct(
                features, support, support_labels, query_idx, query_labels, name[len("proto-") :]
            )
            per_episode = correct.mean(axis=1)
        else:
            # Episode-sized problems are far too small for a multi-threaded BLAS: its threads
            # only contend (10x slower on 2 cores, worse on more), so run them single-threaded.
            # The features were checked for NaN/inf once above, so skip scikit-learn's checks.
            with threadpool_limits(limits=1), config_context(assume_finite=True):
                per_episode = fit_predict_episodes(lambda i: make_classifier(name), features, drawn)[0]
        accuracy, ci95 = mean_ci95(per_episode)
        rows.append(
            {
                "classifier": name,
                "way": sampler.way,
                "shot": sampler.shot,
                "query": sampler.query,
                "episodes": len(drawn),
                "accuracy": accuracy,
                "ci95": ci95,
            }
        )
    return rows


def episode_table(
    items: Any,
    labels: np.ndarray | torch.Tensor,
    ev: EvalConfig,
    encoder: str,
    classifiers: Mapping[str, Callable[[], Any]] | None = None,
    episodes: int | None = None,
    **fields: Any,
) -> list[dict[str, Any]]:
    """Every ``eval.ways`` × ``eval.shots`` on the same seeded episodes, rows tagged with ``encoder``
    (and ``fields``, e.g. ``transductive``): the table every evaluator (images, distances, test-time
    rules, speakers) prints.

    ``classifiers``: name → a factory of a fresh fit/predict classifier, fitted per episode on
    ``items`` (features, images, texts or item indices) through :func:`fit_predict_episodes`; None:
    ``eval.classifiers`` on the feature matrix ``items`` (:func:`run_episodes`, their fast path).
    ``episodes``: how many (default ``eval.episodes``; the first N of the same seeded sequence).
    """
    episodes = ev.episodes if episodes is None else episodes
    rows = []
    for way in ev.ways:
        for shot in ev.shots:
            if classifiers is None:
                found = run_episodes(items, labels, way, shot, ev.queries, episodes, tuple(ev.classifiers), ev.seed)
            else:
                found = [classifier_row(name, make, items, labels, way, shot, ev.queries, episodes, ev.seed) for name, make in classifiers.items()]
            rows += [{"encoder": encoder, **row, **fields} for row in found]
    return rows


def classifier_row(
    name: str, make: Callable[[], Any], items: Any, labels: np.ndarray | torch.Tensor, way: int, shot: int, query: int, episodes: int, seed: int
) -> dict[str, Any]:
    """One row of :func:`run_episodes`'s layout for any fit/predict classifier (``make()`` gives a fresh
    one per episode) over the same seeded ``way``-way ``shot``-shot episodes."""
    sampler = EpisodeSampler(as_label_vector(labels), way, shot, query, seed)
    drawn = list(sampler.episodes(int(episodes)))
    accuracy, ci95 = mean_ci95(fit_predict_episodes(lambda i: make(), items, drawn)[0])
    return {"classifier": name, "way": sampler.way, "shot": sampler.shot, "query": sampler.query,
            "episodes": len(drawn), "accuracy": accuracy, "ci95": ci95}


def _prototype_correct(
    features: np.ndarray,
    support: np.ndarray,
    support_labels: np.ndarray,
    query: np.ndarray,
    query_labels: np.ndarray,
    metric: str,
    max_elements: int = 1 << 24,
) -> np.ndarray:
    """Nearest-prototype correctness (E, way*query) for all episodes, batched over episodes.

    Same rule as :class:`PrototypeClassifier` (the tests check the two agree).
    """
    way = int(support_labels.max()) + 1
    onehot = np.eye(way)[support_labels]  # (way*shot, way)
    counts = onehot.sum(axis=0)
    out = np.empty(query.shape, dtype=bool)
    # Episodes per batch, so the gathered float64 rows stay near 128 MiB.
    chunk = max(1, max_elements // ((support.shape[1] + query.shape[1]) * features.shape[1]))
    for start in range(0, support.shape[0], chunk):
        s = features[support[start : start + chunk]].astype(np.float64)  # (e, way*shot, D)
        q = features[query[start : start + chunk]].astype(np.float64)  # (e, way*query, D)
        if metric == "cosine":
            s = l2_normalize(s)
        protos = np.einsum("snd,nw->swd", s, onehot) / counts[None, :, None]  # (e, way, D)
        if metric == "cosine":
            scores = np.einsum("sqd,swd->sqw", l2_normalize(q), l2_normalize(protos))
        else:
            scores = 2.0 * np.einsum("sqd,swd->sqw", q, protos) - (protos**2).sum(-1)[:, None, :]
        out[start : start + chunk] = scores.argmax(axis=-1) == query_labels[None, :]
    return out


def _embed(embed: Callable[[torch.Tensor], Any], images: torch.Tensor, what: str) -> np.ndarray:
    with torch.no_grad():
        out = embed(images)
    out = as_feature_matrix(out, f"embeddings of {what}")
    if out.shape[0] != len(images):
        raise DataError(f"embed returned {out.shape[0]} rows for {len(images)} {what}")
    return out


def score_lake_runs(
    embed: Callable[[torch.Tensor], torch.Tensor],
    runs: Sequence[Any],
    metric: str = "cosine",
) -> dict[str, Any]:
    """Lake et al. (2015)'s within-alphabet 20-way 1-shot classification runs.

    Each run has ``name``, ``train_images`` (20, C, H, W), ``test_images`` (20, C, H, W) and
    ``answers`` (20,), the index of the correct training image for each test image. Every test
    image is matched to the nearest training image in embedding space (``metric`` "cosine" or
    "euclidean"); a run's score is the fraction matched correctly. ``embed`` maps a batch of
    images (n, C, H, W) to embeddings (n, D) and is called under ``torch.no_grad()``; raw pixels
    are ``lambda x: x.flatten(1)``. Returns ``{"accuracy": fraction over all test items,
    "per_run": {name: fraction}, "metric": metric}``.
    """
    check_metric(metric)
    runs = list(runs)
    if not runs:
        raise DataError("no one-shot runs to score")
    per_run: dict[str, float] = {}
    correct_total = 0
    items_total = 0
    for run in runs:
        name = str(run.name)
        if name in per_run:
            raise DataError(f"two one-shot runs are both named {name!r}")
        answers = as_label_vector(run.answers)
        n_train = len(run.train_images)
        train = _embed(embed, run.train_images, f"training images of run {name}")
        test = _embed(embed, run.test_images, f"test images of run {name}")
        if answers.shape[0] != test.shape[0]:
            raise DataError(
                f"run {name}: {answers.shape[0]} answers for {test.shape[0]} test images"
            )
        if answers.size and answers.max() >= n_train:
            raise DataError(
                f"run {name}: answer {int(answers.max())} is out of range for {n_train} "
                f"training images"
            )
        if train.shape[1] != test.shape[1]:
            raise DataError(
                f"run {name}: embeddings of training and test images differ in size "
                f"({train.shape[1]} vs {test.shape[1]})"
            )
        # Each training image is its own class: nearest neighbour == nearest prototype.
        model = PrototypeClassifier(metric).fit(train, np.arange(n_train))
        predicted = model.predict(test)
        hits = int((predicted == answers).sum())
        per_run[name] = hits / answers.shape[0]
        correct_total += hits
        items_total += answers.shape[0]
    return {"accuracy": correct_total / items_total, "per_run": per_run, "metric": metric}


def score_lake_runs_by_distance(
    distance: Callable[[torch.Tensor, torch.Tensor], torch.Tensor | np.ndarray], runs: Sequence[Any], metric: str = "distance"
) -> dict[str, Any]:
    """Lake's runs scored by a distance between images: ``distance(test_images, train_images)``
    returns the (M, N) matrix; each test item goes to the training image at the smallest distance.
    Same result layout as :func:`score_lake_runs`."""
    runs = list(runs)
    if not runs:
        raise DataError("no one-shot runs to score")
    per_run: dict[str, float] = {}
    hits_total = items = 0
    for run in runs:
        answers = as_label_vector(run.answers)
        d = np.asarray(distance(run.test_images, run.train_images), dtype=np.float64)
        if d.shape != (len(run.test_images), len(run.train_images)):
            raise DataError(f"run {run.name}: distance returned shape {d.shape}, expected {(len(run.test_images), len(run.train_images))}")
        hits = int((d.argmin(axis=1) == answers).sum())
        per_run[str(run.name)] = hits / len(answers)
        hits_total += hits
        items += len(answers)
    return {"accuracy": hits_total / items, "per_run": per_run, "metric": metric}
