"""Linear probes trained on a fraction of the labels (SimCLR's semi-supervised evaluation).

Chen et al. (2020, SimCLR, table 7) report accuracy with 1% and 10% of the ImageNet labels.
Here, on precomputed features of a labeled evaluation set:

1. a stratified, seeded split into a train part and a test part (``test_fraction`` of every
   class goes to test; each class keeps at least one example on each side);
2. for each fraction, a stratified subset of the train part: ``round(fraction * n_c)`` examples
   of each class ``c`` (at least one). The subsets are nested (the 1% subset is inside the 10%
   subset), so differences between fractions are not split noise;
3. the registry's ``logreg`` (scikit-learn ``LogisticRegression``, C = 1.0, lbfgs, on
   L2-normalised features, the same classifier the episodes use) fitted on the subset and scored
   on the whole test part.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from fewshot.errors import ConfigError, DataError
from fewshot.evaluate.classifiers import make_classifier
from fewshot.evaluate.episodes import as_feature_matrix, as_label_vector

__all__ = ["linear_probe_fractions"]


def _round_half_up(x: float) -> int:
    return int(math.floor(x + 0.5))


def linear_probe_fractions(
    features: np.ndarray | torch.Tensor,
    labels: np.ndarray | torch.Tensor,
    fractions: Sequence[float] = (0.01, 0.1, 1.0),
    test_fraction: float = 0.5,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """Test accuracy of a linear probe trained on each fraction of the train part's labels.

    Returns one row per fraction, in the order given:
    ``{"fraction", "train_examples", "accuracy"}`` (accuracy as a fraction).
    """
    features = as_feature_matrix(features)
    labels = as_label_vector(labels, features.shape[0])
    fractions = tuple(fractions)
    if not fractions:
        raise ConfigError("no label fractions given")
    for f in fractions:
        if isinstance(f, bool) or not isinstance(f, (int, float)) or not 0.0 < f <= 1.0:
            raise ConfigError(f"label fractions must be in (0, 1], got {f!r}")
    if isinstance(test_fraction, bool) or not 0.0 < test_fraction < 1.0:
        raise ConfigError(f"test_fraction must be in (0, 1), got {test_fraction!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ConfigError(f"seed must be a non-negative integer, got {seed!r}")

    classes, counts = np.unique(labels, return_counts=True)
    if len(classes) < 2:
        raise DataError(f"a linear probe needs at least 2 classes, the set has {len(classes)}")
    if counts.min() < 2:
        c = int(classes[np.argmin(counts)])
        raise DataError(
            f"class {c} has {int(counts.min())} example; the probe needs at least 2 per class "
            f"(one to train on, one to test on)"
        )

    rng = np.random.default_rng(seed)
    train_parts: list[np.ndarray] = []  # per class, in random order
    test_parts: list[np.ndarray] = []
    for c in classes:
        members = rng.permutation(np.flatnonzero(labels == c))
        n_test = min(max(_round_half_up(test_fraction * len(members)), 1), len(members) - 1)
        test_parts.append(members[:n_test])
        train_parts.append(members[n_test:])
    test = np.concatenate(test_parts)

    rows = []
    for f in fractions:
        train = np.concatenate(
            [part[: max(1, _round_half_up(f * len(part)))] for part in train_parts]
        )
        model = make_classifier("logreg").fit(features[train], labels[train])
        accuracy = float((model.predict(features[test]) == labels[test]).mean())
        rows.append({"fraction": float(f), "train_examples": int(train.size), "accuracy": accuracy})
    return rows
