"""Episodic (meta-learning) objectives: classify an episode's queries from its support set.

An episode has N classes, S support and Q query embeddings per class: ``support`` (N, S, D)
and ``query`` (N, Q, D), the class of a row being its index n. Each objective builds a
classifier from the support set alone, scores every query against the N classes and returns
the cross-entropy of the query's class (the mean over the N·Q queries) together with the
episode accuracy (detached, for logs):

* :func:`prototypical_loss`: nearest class mean (Snell, Swersky & Zemel 2017).
* :func:`r2d2_loss`: ridge regression solved in closed form (Bertinetto, Henriques, Torr &
  Vedaldi 2019, "Meta-learning with differentiable closed-form solvers", R2-D2).

Without labels, ProtoCLR (Medina, Devos & Grossglauser 2020) makes the episode from one batch:
each image is its own class, its support is S views (or the image itself) and its queries Q
other augmented views. The functions do not care where the classes come from.

Shape errors raise :class:`ValueError`; out-of-range hyper-parameters raise
:class:`fewshot.errors.ConfigError` (itself a ``ValueError``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fewshot.errors import ConfigError

__all__ = [
    "PROTO_METRICS",
    "R2D2Head",
    "episode_labels",
    "prototypical_logits",
    "prototypical_loss",
    "r2d2_logits",
    "r2d2_loss",
    "ridge_regression_head",
]

PROTO_METRICS = ("euclidean", "cosine")


def _check_episode(support: object, query: object) -> tuple[Tensor, Tensor]:
    for name, x, shape in (("support", support, "(N, S, D)"), ("query", query, "(N, Q, D)")):
        if not isinstance(x, Tensor) or x.ndim != 3 or 0 in x.shape:
            got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"{name} must be a non-empty 3-D tensor {shape}, got shape {got}")
        if not x.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
    if support.shape[0] != query.shape[0] or support.shape[2] != query.shape[2]:
        raise ValueError(
            f"support (N, S, D) and query (N, Q, D) must agree on N and D, got {tuple(support.shape)} and {tuple(query.shape)}"
        )
    return support, query


def _check_positive(name: str, value: float) -> None:
    if not (value > 0) or not math.isfinite(value):  # `not (v > 0)` also rejects NaN
        raise ConfigError(f"{name} must be a finite number > 0, got {value}")


def episode_labels(n: int, q: int, device: torch.device | None = None) -> Tensor:
    """The class of each flattened query, (N·Q,): 0 repeated Q times, then 1, …; the row order
    of ``query.reshape(N * Q, D)``."""
    return torch.arange(n, device=device).repeat_interleave(q)


def _cross_entropy_and_accuracy(logits: Tensor, n: int, q: int) -> tuple[Tensor, Tensor]:
    labels = episode_labels(n, q, logits.device)
    accuracy = (logits.detach().argmax(dim=1) == labels).float().mean()
    return F.cross_entropy(logits, labels), accuracy


# --------------------------------------------------------------------------- prototypes


def prototypical_logits(support: Tensor, query: Tensor, metric: str = "euclidean", temperature: float = 1.0) -> Tensor:
    """Logits of every query against the N class prototypes (Snell et al. 2017).

    c_n = (1/S) Σ_s support[n, s]                      (the prototype of class n)
    euclidean: logit(q, n) = −‖q − c_n‖²               (Snell et al.: squared distance, no scale)
    cosine:    logit(q, n) = cos(q, c_n) / τ

    Args:
        support: (N, S, D) support embeddings, S per class.
        query: (N, Q, D) query embeddings, Q per class.
        metric: "euclidean" or "cosine".
        temperature: τ of the cosine logits; not used by "euclidean".

    Returns:
        (N·Q, N) logits, rows in the order of ``query.reshape(N * Q, D)``.
    """
    support, query = _check_episode(support, query)
    if metric not in PROTO_METRICS:
        raise ConfigError(f"unknown prototype metric {metric!r}; known: {', '.join(PROTO_METRICS)}")
    prototypes = support.mean(dim=1)  # (N, D)
    q = query.reshape(-1, query.shape[-1])  # (N·Q, D)
    if metric == "cosine":
        _check_positive("temperature", temperature)
        return F.normalize(q, dim=1) @ F.normalize(prototypes, dim=1).T / temperature
    # ‖q‖² + ‖c‖² − 2qᵀc: one matmul instead of an (N·Q, N, D) difference; clamp the rounding below 0.
    sq = q.pow(2).sum(1, keepdim=True) + prototypes.pow(2).sum(1) - 2.0 * q @ prototypes.T
    return -sq.clamp_min(0.0)


def prototypical_loss(
    support: Tensor, query: Tensor, metric: str = "euclidean", temperature: float = 1.0
) -> tuple[Tensor, Tensor]:
    """Prototypical-network loss (Snell et al. 2017; unsupervised: ProtoCLR, Medina et al. 2020).

    L = −(1/NQ) Σ_n Σ_j log softmax_n'( logit(query[n, j], n') )[n]

    with the logits of :func:`prototypical_logits`: each query is compared with the N
    prototypes only, not with every other embedding of the batch (as NT-Xent would).

    Args:
        support: (N, S, D); query: (N, Q, D); metric, temperature: see :func:`prototypical_logits`.

    Returns:
        (loss, accuracy): the scalar loss and the detached fraction of queries whose highest
        logit is their own class.
    """
    logits = prototypical_logits(support, query, metric, temperature)
    return _cross_entropy_and_accuracy(logits, query.shape[0], query.shape[1])


# --------------------------------------------------------------------------- ridge regression


def ridge_regression_head(x: Tensor, y: Tensor, lam: Tensor | float) -> Tensor:
    """Ridge-regression weights in closed form: W = argmin_W ‖XW − Y‖² + λ‖W‖².

    W = (XᵀX + λI_D)⁻¹ XᵀY = Xᵀ(XXᵀ + λI_n)⁻¹ Y

    The two forms are equal (push-through / Woodbury identity); R2-D2 (Bertinetto et al. 2019,
    §3.2) solves the second, an n×n system, because an episode has fewer support examples n
    than features D. Here the smaller of the two systems is solved, so the cost is
    O(min(n, D)³) either way. Differentiable in X and λ.

    Args:
        x: (n, D) support embeddings X.
        y: (n, C) targets Y (one-hot labels in R2-D2).
        lam: λ > 0, a float or a scalar tensor (learnable).

    Returns:
        (D, C) weights W.
    """
    if not isinstance(x, Tensor) or x.ndim != 2 or not isinstance(y, Tensor) or y.ndim != 2 or x.shape[0] != y.shape[0]:
        got = [tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__ for t in (x, y)]
        raise ValueError(f"ridge regression needs x (n, D) and y (n, C) with the same n, got {got[0]} and {got[1]}")
    if not isinstance(lam, Tensor):
        _check_positive("lambda", lam)
    n, d = x.shape
    if n <= d:
        eye = torch.eye(n, dtype=x.dtype, device=x.device)
        return x.T @ torch.linalg.solve(x @ x.T + lam * eye, y.to(x.dtype))
    eye = torch.eye(d, dtype=x.dtype, device=x.device)
    return torch.linalg.solve(x.T @ x + lam * eye, x.T @ y.to(x.dtype))


def r2d2_logits(support: Tensor, query: Tensor, lam: Tensor | float, scale: Tensor | float = 1.0, bias: Tensor | float = 0.0) -> Tensor:
    """R2-D2's logits (Bertinetto et al. 2019, eq. 5 and §3.2): ridge regression of one-hot labels.

    X = support.reshape(N·S, D),  Y = one-hot class of each support row (N·S, N)
    W = Xᵀ(XXᵀ + λI)⁻¹Y                                  (:func:`ridge_regression_head`)
    logits = α · X_q W + β,  X_q = query.reshape(N·Q, D)

    α and β (``scale``, ``bias``) calibrate the regression outputs for the cross-entropy; the
    paper learns them with λ. A scalar β shifts every logit of a row equally, so softmax and the
    loss do not depend on it; it is kept here to match the paper's head.

    Args:
        support: (N, S, D); query: (N, Q, D).
        lam: λ > 0; scale: α; bias: β (floats or scalar tensors).

    Returns:
        (N·Q, N) logits, rows in the order of ``query.reshape(N * Q, D)``.
    """
    support, query = _check_episode(support, query)
    n, s, d = support.shape
    x = support.reshape(n * s, d)
    y = F.one_hot(episode_labels(n, s, support.device), n).to(support.dtype)
    w = ridge_regression_head(x, y, lam)
    return scale * (query.reshape(-1, d) @ w) + bias


def r2d2_loss(
    support: Tensor, query: Tensor, lam: Tensor | float, scale: Tensor | float = 1.0, bias: Tensor | float = 0.0
) -> tuple[Tensor, Tensor]:
    """R2-D2 loss (Bertinetto et al. 2019): cross-entropy of the queries under the ridge-regression
    classifier fitted to the support set in closed form.

    L = −(1/NQ) Σ_n Σ_j log softmax( α · query[n, j] W + β )[n],  W = Xᵀ(XXᵀ + λI)⁻¹Y

    Args and the logits: see :func:`r2d2_logits`.

    Returns:
        (loss, accuracy) as :func:`prototypical_loss`.
    """
    logits = r2d2_logits(support, query, lam, scale, bias)
    return _cross_entropy_and_accuracy(logits, query.shape[0], query.shape[1])


class R2D2Head(nn.Module):
    """R2-D2's base learner with its learnable λ and α; ``head(support, query) -> (loss, accuracy)``.

    λ and α are kept positive by a log parametrisation (λ = exp(ρ), α = exp(a)); the paper's
    code learns them in a linear or power parametrisation, initialised at λ = 1. The paper's β is
    not learned: under softmax cross-entropy a scalar β has zero gradient, and Adam, which divides
    by the gradient's size, would turn the rounding noise in that zero into steps of size lr.
    """

    def __init__(self, lambda_init: float = 1.0, scale_init: float = 10.0) -> None:
        super().__init__()
        _check_positive("r2d2 lambda_init", lambda_init)
        _check_positive("r2d2 scale_init", scale_init)
        self.log_lambda = nn.Parameter(torch.tensor(math.log(lambda_init)))
        self.log_scale = nn.Parameter(torch.tensor(math.log(scale_init)))

    @property
    def lam(self) -> Tensor:
        return self.log_lambda.exp()

    @property
    def scale(self) -> Tensor:
        return self.log_scale.exp()

    def forward(self, support: Tensor, query: Tensor) -> tuple[Tensor, Tensor]:
        return r2d2_loss(support, query, self.lam, self.scale)
