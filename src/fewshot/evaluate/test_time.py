"""Test-time options, reported apart from the inductive headline.

* ``tta`` — test-time augmentation: r(x) = mean of the L2-normalised embeddings of x and of
  ``n`` augmented views of x (the run's own view recipe, seeded). Still inductive: each item is
  embedded alone.
* ``hub`` — hub correction with CSLS (Conneau et al. 2018, "Word translation without parallel
  data", eq. 6): with cosine similarities, r_Q(c) the mean similarity of prototype c to its k
  nearest queries and r_P(q) that of query q to its k nearest prototypes,
  CSLS(q, c) = 2·cos(q, c) − r_P(q) − r_Q(c). A prototype close to every query (a hub) is
  pushed down. **Transductive**: it uses the other test items of the run or episode.
* ``hungarian`` — one-to-one assignment: the queries of a run or episode are matched to the
  classes so that each class gets exactly its number of queries (Lake's runs and 1-query
  episodes: one each), maximising the total cosine similarity (Kuhn's Hungarian method, scipy's
  ``linear_sum_assignment``). **Transductive**.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from fewshot.errors import ConfigError, DataError
from fewshot.evaluate.classifiers import l2_normalize
from fewshot.evaluate.episodes import as_feature_matrix, as_label_vector

__all__ = ["TRANSDUCTIVE", "TestTimePrototypes", "csls_scores", "hungarian_predict", "predict", "score_lake_runs_test_time", "tta_embed"]

TRANSDUCTIVE = ("hub", "hungarian")
HUB_K = 10  # CSLS's neighbourhood size (Conneau et al. 2018: 10)


def csls_scores(queries: np.ndarray, prototypes: np.ndarray, k: int = HUB_K) -> np.ndarray:
    """CSLS(q, c) = 2·cos(q, c) − r_P(q) − r_Q(c): queries (Q, D), prototypes (N, D) → (Q, N);
    r_Q(c) = mean of the min(k, Q) largest cos(q', c) over queries, r_P(q) likewise over prototypes."""
    cos = l2_normalize(queries) @ l2_normalize(prototypes).T
    kq, kp = min(k, cos.shape[0]), min(k, cos.shape[1])
    r_q = np.sort(cos, axis=0)[-kq:].mean(axis=0)  # (N,)
    r_p = np.sort(cos, axis=1)[:, -kp:].mean(axis=1)  # (Q,)
    return 2 * cos - r_p[:, None] - r_q[None, :]


def hungarian_predict(scores: np.ndarray, per_class: int = 1) -> np.ndarray:
    """Class of each query (Q,) under the one-to-one assignment that maximises Σ scores, each of the
    N classes taking ``per_class`` queries (Q = N·per_class; a class's columns are repeated)."""
    q, n = scores.shape
    if q != n * per_class:
        raise DataError(f"one-to-one assignment needs {n} classes × {per_class} queries = {n * per_class} queries, got {q}")
    rows, cols = linear_sum_assignment(np.repeat(scores, per_class, axis=1), maximize=True)
    out = np.empty(q, dtype=np.int64)
    out[rows] = cols // per_class
    return out


def predict(rule: str, queries: np.ndarray, prototypes: np.ndarray, per_class: int = 1) -> np.ndarray:
    """Predicted class per query under ``rule`` (cosine, hub, hungarian), all on cosine similarities."""
    if rule == "cosine":
        return (l2_normalize(queries) @ l2_normalize(prototypes).T).argmax(1)
    if rule == "hub":
        return csls_scores(queries, prototypes).argmax(1)
    if rule == "hungarian":
        return hungarian_predict(l2_normalize(queries) @ l2_normalize(prototypes).T, per_class)
    raise ConfigError(f"unknown test-time rule {rule!r}; choose one of: cosine, hub, hungarian")


def tta_embed(embed: Callable[[torch.Tensor], torch.Tensor], views: Any, n: int, seed: int = 0) -> Callable[[torch.Tensor], torch.Tensor]:
    """An embed function that averages the L2-normalised embeddings of x and of ``n`` views of x,
    r(x) = (1/(n+1)) Σ_{v ∈ {x, t₁(x) … t_n(x)}} f(v)/‖f(v)‖, the views drawn by the recipe
    ``views(x, generator)`` from a generator seeded per call (the same images get the same views)."""

    def run(x: torch.Tensor) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        total = torch.nn.functional.normalize(torch.as_tensor(embed(x)).float(), dim=1)
        with torch.no_grad():
            for _ in range(n):
                total = total + torch.nn.functional.normalize(torch.as_tensor(embed(views(x, g).contiguous())).float(), dim=1)
        return total / (n + 1)

    return run


def score_lake_runs_test_time(embed: Callable[[torch.Tensor], torch.Tensor], runs: Sequence[Any], rule: str) -> dict[str, Any]:
    """Lake's runs with the training images as one-shot prototypes and ``rule`` deciding; layout as
    :func:`fewshot.evaluate.runner.score_lake_runs`, plus ``transductive``."""
    per_run, hits, items = {}, 0, 0
    for run in runs:
        with torch.no_grad():
            train, test = as_feature_matrix(embed(run.train_images)), as_feature_matrix(embed(run.test_images))
        answers = as_label_vector(run.answers)
        per_class = len(answers) // len(train) if rule == "hungarian" else 1
        h = int((predict(rule, test, train, per_class) == answers).sum())
        per_run[str(run.name)] = h / len(answers)
        hits, items = hits + h, items + len(answers)
    return {"accuracy": hits / items, "per_run": per_run, "metric": rule, "transductive": rule in TRANSDUCTIVE}


class TestTimePrototypes:
    """Cosine prototypes (the mean of the L2-normalised support features per class) with ``rule``
    deciding (cosine, hub, hungarian); fit/predict, for the evaluator's episode runner. The
    queries are balanced, so Hungarian gives each class len(query) / classes of them."""

    def __init__(self, rule: str) -> None:
        self.rule = rule

    def fit(self, support: np.ndarray, labels: np.ndarray) -> "TestTimePrototypes":
        s = l2_normalize(as_feature_matrix(support))
        labels = as_label_vector(labels, len(s))
        self.prototypes_ = np.stack([s[labels == c].mean(0) for c in range(int(labels.max()) + 1)])
        return self

    def predict(self, query: np.ndarray) -> np.ndarray:
        query = as_feature_matrix(query)
        return predict(self.rule, query, self.prototypes_, len(query) // len(self.prototypes_))
