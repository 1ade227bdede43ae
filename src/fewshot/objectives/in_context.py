"""The in-context regression objective, a pure function."""

from __future__ import annotations

import torch


def in_context_squared_error(predictions: torch.Tensor, ys: torch.Tensor, min_context: int = 0) -> torch.Tensor:
    """Mean squared error at every query position of a prompt (Garg et al. 2022, eq. 2):

        L = 1/(B · (n − c)) Σ_b Σ_{i=c}^{n−1} (ŷ_{b,i} − y_{b,i})²

    where ŷ_{b,i} = M(x_1, y_1, …, x_i, y_i, x_{i+1}) is the prediction of the (i+1)-th target from the i
    pairs before it (0-based position i) and c = ``min_context`` leaves out positions with fewer in-context
    examples (c = 0: every position, Garg et al.; c = n − 1: the last query only, von Oswald et al. 2023).

    predictions, ys: (B, n). Raises ValueError on other shapes or when no position is left.
    """
    if predictions.shape != ys.shape or predictions.ndim != 2:
        raise ValueError(f"predictions and ys must both be (B, n), got {tuple(predictions.shape)} and {tuple(ys.shape)}")
    if not 0 <= min_context < ys.shape[1]:
        raise ValueError(f"min_context={min_context} leaves no position of a {ys.shape[1]}-point prompt in the loss")
    return (predictions[:, min_context:] - ys[:, min_context:]).pow(2).mean()


__all__ = ["in_context_squared_error"]
