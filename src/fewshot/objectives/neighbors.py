"""Positives from the data: nearest neighbours in a support set (NNCLR) and pseudo-classes (k-means).

Pure functions; the method (``fewshot.methods.neighbors``) owns the support queue.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from fewshot.errors import ConfigError, DataError

__all__ = ["nearest_support", "nnclr_loss", "spherical_kmeans"]


def nearest_support(z: Tensor, support: Tensor, excluded: Tensor | None = None) -> Tensor:
    """Index of each row's nearest neighbour in the support set by cosine similarity:
    NN(z_i, Q) = argmax_{q ∈ Q, not excluded(i, q)} cos(z_i, q).

    z: (B, D); support: (K, D); excluded: optional (B, K) bool, True where q may not be row i's
    neighbour (its own image). Returns (B,) long; a row with every entry excluded gets −1.
    """
    if support.ndim != 2 or z.ndim != 2 or z.shape[1] != support.shape[1]:
        raise DataError(f"nearest_support: z {tuple(z.shape)} and support {tuple(support.shape)} must be (B, D) and (K, D)")
    sim = F.normalize(z, dim=1) @ F.normalize(support, dim=1).T
    if excluded is not None:
        sim = sim.masked_fill(excluded, float("-inf"))
    best = sim.argmax(1)
    return torch.where(torch.isfinite(sim.gather(1, best[:, None])[:, 0]), best, torch.full_like(best, -1))


def nnclr_loss(neighbors: Tensor, predictions: Tensor, temperature: float = 0.1) -> Tensor:
    """NNCLR's loss (Dwibedi et al. 2021, "With a little help from my friends", eq. 3): with
    nn_i = NN(z_i, Q) the support-set neighbour of view 1 of image i and p_j the prediction of
    view 2 of image j, all unit vectors,

        ℓ_i = −log( exp(nn_i·p_i/τ) / Σ_{j=1..B} exp(nn_i·p_j/τ) ),   L = (1/B) Σ_i ℓ_i.

    neighbors: (B, D), from the support set (no gradient); predictions: (B, D). The method adds
    the symmetric term with the views swapped, as the paper does.
    """
    if temperature <= 0:
        raise ConfigError(f"temperature must be > 0, got {temperature}")
    if neighbors.shape != predictions.shape:
        raise DataError(f"nnclr_loss: neighbors {tuple(neighbors.shape)} and predictions {tuple(predictions.shape)} differ")
    logits = F.normalize(neighbors, dim=1) @ F.normalize(predictions, dim=1).T / temperature
    return F.cross_entropy(logits, torch.arange(len(logits), device=logits.device))


def spherical_kmeans(x: Tensor, k: int, iters: int = 20, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """k-means on the unit sphere (cosine similarity): rows of ``x`` (N, D) are L2-normalised,
    centroids start at k distinct rows drawn with ``generator``, then alternately
    a_i = argmax_c x_i·μ_c and μ_c = normalise(Σ_{a_i = c} x_i) (an empty cluster keeps its
    centroid). Returns (centroids (k, D), assignments (N,))."""
    if not 1 <= k <= len(x):
        raise ConfigError(f"k-means needs 1 ≤ k ≤ N points, got k={k} for {len(x)} points")
    x = F.normalize(x.float(), dim=1)
    centroids = x[torch.randperm(len(x), generator=generator)[:k].to(x.device)].clone()
    assign = torch.zeros(len(x), dtype=torch.long, device=x.device)
    for _ in range(iters):
        assign = (x @ centroids.T).argmax(1)
        sums = torch.zeros_like(centroids).index_add_(0, assign, x)
        filled = sums.norm(dim=1) > 0
        centroids = torch.where(filled[:, None], F.normalize(sums, dim=1), centroids)
    return centroids, (x @ centroids.T).argmax(1)
