"""Lake et al.'s modified Hausdorff distance baseline: ink points of each image, nearest neighbour.

Dubuisson & Jain (1994), "A modified Hausdorff distance for object matching", as in the one-shot
classification demo of the Omniglot release (``demo_classification.py``): each image becomes the
coordinates of its ink pixels, centred on their mean; two point sets A and B are at distance

    d(A, B) = max( (1/|A|) Σ_{a∈A} min_{b∈B} ‖a − b‖,  (1/|B|) Σ_{b∈B} min_{a∈A} ‖a − b‖ )

and a test item goes to the training image at the smallest distance (no prototypes: the distance
is between point sets, not vectors). On the 20 runs at 105 px this is the demo's 38.8% error
(61.2% correct). ``normalized=True`` maps the points through the same moment normalisation as
:func:`fewshot.data.normalize.normalize_points` (centre, per-axis spread, stretch cap) first.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from scipy.spatial import cKDTree

from fewshot.data.normalize import normalize_points
from fewshot.errors import DataError

__all__ = ["ink_points", "mhd_matrix", "modified_hausdorff", "point_sets"]

INK_THRESHOLD = 0.5


def ink_points(image: torch.Tensor, threshold: float = INK_THRESHOLD, center: bool = True) -> torch.Tensor:
    """(P, 2) float (row, col) coordinates of the pixels with ink ≥ ``threshold`` (ink bright,
    channels averaged), minus their mean when ``center`` (as the demo's LoadImgAsPoints does)."""
    if image.ndim == 3:
        image = image.float().mean(0)
    if image.ndim != 2:
        raise DataError(f"ink_points takes one image (C, H, W) or (H, W), got shape {tuple(image.shape)}")
    p = (image >= threshold).nonzero().float()
    if len(p) == 0:
        raise DataError("an image has no ink pixels (≥ 0.5): the modified Hausdorff distance needs at least one")
    return p - p.mean(0) if center else p


def point_sets(
    images: torch.Tensor, normalized: bool = False, spread_px: float = 16.8, max_stretch: float = 2.0
) -> list[torch.Tensor]:
    """Centred ink points of each image (N, C, H, W); with ``normalized`` also scaled per axis to
    standard deviation ``spread_px`` (:func:`fewshot.data.normalize.normalize_points`)."""
    out = [ink_points(im) for im in images]
    return [normalize_points(p, spread_px, max_stretch) for p in out] if normalized else out


def modified_hausdorff(a: torch.Tensor, b: torch.Tensor) -> float:
    """d(A, B) = max(mean_a min_b ‖a − b‖, mean_b min_a ‖a − b‖) for point sets a: (P, 2), b: (Q, 2)."""
    d = torch.cdist(a.double()[None], b.double()[None])[0]
    return float(torch.maximum(d.min(1).values.mean(), d.min(0).values.mean()))


def mhd_matrix(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor], pairs: torch.Tensor | None = None) -> torch.Tensor:
    """Modified Hausdorff distances between point sets: (len(a), len(b)), or only at ``pairs`` (K, 2)
    index rows (i into a, j into b) — the others are NaN.

    Exact: the nearest neighbours come from a k-d tree per point set (scipy's cKDTree), built once
    and queried by every partner — about 8× faster than the padded all-pairs distance matrices on
    Omniglot's ~900 ink points per 105 px image, with the same result (the tests compare it with
    a brute-force loop).
    """
    if len(a) == 0 or len(b) == 0:
        raise DataError("mhd_matrix needs at least one point set on each side")
    if pairs is None:
        ii, jj = torch.meshgrid(torch.arange(len(a)), torch.arange(len(b)), indexing="ij")
        pairs = torch.stack([ii.flatten(), jj.flatten()], 1)
    out = torch.full((len(a), len(b)), float("nan"), dtype=torch.float64)
    pa = [np.asarray(x, dtype=np.float64) for x in a]
    pb = [np.asarray(x, dtype=np.float64) for x in b]
    trees_a: dict[int, cKDTree] = {}
    trees_b: dict[int, cKDTree] = {}
    for i, j in pairs.tolist():
        ta = trees_a.get(i) or trees_a.setdefault(i, cKDTree(pa[i]))
        tb = trees_b.get(j) or trees_b.setdefault(j, cKDTree(pb[j]))
        out[i, j] = max(tb.query(pa[i])[0].mean(), ta.query(pb[j])[0].mean())
    return out
