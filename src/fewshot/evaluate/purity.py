"""How often data-derived positives are right: purity of nearest neighbours and of clusters against
the true classes. The labels are only measured here, never trained on."""

from __future__ import annotations

import numpy as np
import torch

from fewshot.errors import DataError

__all__ = ["cluster_purity", "neighbour_purity"]


def neighbour_purity(features: torch.Tensor | np.ndarray, labels: torch.Tensor | np.ndarray, k: int = 1) -> float:
    """Fraction of (item, neighbour) pairs with the same label, over each item's k nearest other
    items by cosine similarity: (1/(N·k)) Σ_i Σ_{j ∈ kNN(i), j ≠ i} [y_j = y_i]."""
    x = torch.nn.functional.normalize(torch.as_tensor(np.asarray(features), dtype=torch.float32), dim=1)
    y = torch.as_tensor(np.asarray(labels))
    if len(x) != len(y) or not 1 <= k < len(x):
        raise DataError(f"neighbour_purity: {len(x)} items, {len(y)} labels, k={k} (need 1 ≤ k < items)")
    sim = x @ x.T
    sim.fill_diagonal_(float("-inf"))
    nn_idx = sim.topk(k, dim=1).indices
    return float((y[nn_idx] == y[:, None]).float().mean())


def cluster_purity(assignments: torch.Tensor | np.ndarray, labels: torch.Tensor | np.ndarray) -> float:
    """Purity of a clustering: (1/N) Σ_c max_y |{i : a_i = c, y_i = y}| — each cluster counted
    as its most frequent class."""
    a = np.asarray(assignments).reshape(-1)
    y = np.asarray(labels).reshape(-1)
    if a.shape != y.shape or a.size == 0:
        raise DataError(f"cluster_purity: {a.size} assignments for {y.size} labels")
    _, a_idx = np.unique(a, return_inverse=True)
    _, y_idx = np.unique(y, return_inverse=True)
    counts = np.zeros((a_idx.max() + 1, y_idx.max() + 1), dtype=np.int64)
    np.add.at(counts, (a_idx, y_idx), 1)
    return float(counts.max(axis=1).sum() / a.size)
