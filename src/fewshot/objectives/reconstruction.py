"""Reconstruction objectives: autoencoders and masked autoencoders, as pure functions.

Every function is stateless; the losses return a scalar tensor. Shape errors raise
:class:`ValueError`; out-of-range hyper-parameters (k, eps) raise
:class:`fewshot.errors.ConfigError`, itself a ``ValueError``, because they come from a recipe.

* :func:`mse_reconstruction`, :func:`bce_reconstruction` -- how far x̂ is from x.
* :func:`l1_sparsity`, :func:`topk_sparsify` -- the two sparsity bottlenecks on the code r.
* :func:`norm_pix_target`, :func:`masked_patch_loss` -- MAE's per-patch target and its loss
  on the removed patches only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from fewshot.errors import ConfigError

__all__ = [
    "mse_reconstruction",
    "bce_reconstruction",
    "l1_sparsity",
    "topk_sparsify",
    "norm_pix_target",
    "masked_patch_loss",
]


def _shape(x: object) -> object:
    return tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__


def _check_pair(name: str, pred: object, target: object) -> None:
    if not isinstance(pred, Tensor) or not isinstance(target, Tensor) or pred.shape != target.shape:
        raise ValueError(f"{name}: prediction and target must be tensors of one shape, got {_shape(pred)} and {_shape(target)}")
    if pred.ndim < 2 or pred.shape[0] == 0:
        raise ValueError(f"{name}: expected a non-empty batch (B, ...), got shape {_shape(pred)}")


def mse_reconstruction(x_hat: Tensor, x: Tensor) -> Tensor:
    """Mean squared error per pixel: L = 1/(B·D) Σ_b Σ_d (x̂_bd − x_bd)².

    The Gaussian-likelihood reconstruction of an autoencoder (Goodfellow, Bengio & Courville
    2016, ch. 14), for real-valued pixels.

    Args:
        x_hat: (B, C, H, W) or (B, D) reconstruction.
        x: same shape, the target (the clean input for a denoising autoencoder).
    """
    _check_pair("mse_reconstruction", x_hat, x)
    return F.mse_loss(x_hat, x)


def bce_reconstruction(logits: Tensor, x: Tensor) -> Tensor:
    """Binary cross-entropy per pixel, from logits ℓ:

        L = −1/(B·D) Σ_b Σ_d [ x_bd · log σ(ℓ_bd) + (1 − x_bd) · log(1 − σ(ℓ_bd)) ]

    The Bernoulli-likelihood reconstruction for pixels in [0, 1] (Vincent et al. 2008, §2.2,
    "cross-entropy loss"), computed stably from logits; x̂ = σ(ℓ) is the reconstruction.

    Args:
        logits: (B, C, H, W) or (B, D) decoder outputs before the sigmoid.
        x: same shape, targets in [0, 1].
    """
    _check_pair("bce_reconstruction", logits, x)
    return F.binary_cross_entropy_with_logits(logits, x)


def l1_sparsity(r: Tensor) -> Tensor:
    """L1 sparsity penalty on codes: Ω(r) = 1/B Σ_b Σ_j |r_bj| (the method scales it by λ).

    Summed over code units and averaged over the batch, the sparse-autoencoder penalty
    λ Σ_j |h_j| (Goodfellow, Bengio & Courville 2016, §14.2.1; Ng 2011's L1 variant).

    Args:
        r: (B, K) codes.
    """
    if not isinstance(r, Tensor) or r.ndim != 2 or r.shape[0] == 0:
        raise ValueError(f"l1_sparsity: r must be a non-empty 2-D tensor (B, K), got shape {_shape(r)}")
    return r.abs().sum(dim=1).mean()


def topk_sparsify(r: Tensor, k: int) -> Tensor:
    """k-sparse code (Makhzani & Frey 2014, "k-Sparse Autoencoders"): per row, keep the k
    largest entries of r and set the others to 0,

        out_bj = r_bj if j ∈ supp_k(r_b) else 0,   supp_k = indices of the k largest values.

    Gradients flow only through the kept entries (the paper backpropagates through the support).
    Ties at the k-th value are broken by :func:`torch.topk`, so exactly k entries are kept.

    Args:
        r: (B, K) codes.
        k: 1 ≤ k ≤ K.
    """
    if not isinstance(r, Tensor) or r.ndim != 2:
        raise ValueError(f"topk_sparsify: r must be a 2-D tensor (B, K), got shape {_shape(r)}")
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= r.shape[1]:
        raise ConfigError(f"top-k sparsity needs 1 ≤ k ≤ code size {r.shape[1]}, got k={k}")
    values, indices = r.topk(k, dim=1)
    return torch.zeros_like(r).scatter(1, indices, values)


def norm_pix_target(patches: Tensor, eps: float = 1e-6) -> Tensor:
    """MAE's normalised-pixel target (He et al. 2022, §3 "Reconstruction target"): each patch
    standardised by its own mean and variance,

        t_bl = (p_bl − mean(p_bl)) / sqrt(var(p_bl) + eps),

    mean and variance over the patch's D = p·p·C pixels; the variance is the unbiased one
    (÷ (D − 1)), as in the paper's released code (``target.var(dim=-1)``).

    Args:
        patches: (B, L, D) pixel patches (:func:`fewshot.data.masking.patchify`), D ≥ 2.
    """
    if not isinstance(patches, Tensor) or patches.ndim != 3 or patches.shape[-1] < 2:
        raise ValueError(f"norm_pix_target: patches must be (B, L, D) with D ≥ 2, got shape {_shape(patches)}")
    if not eps > 0:
        raise ConfigError(f"norm_pix_target: eps must be > 0, got {eps}")
    mean = patches.mean(dim=-1, keepdim=True)
    var = patches.var(dim=-1, keepdim=True)
    return (patches - mean) / (var + eps).sqrt()


def masked_patch_loss(pred: Tensor, target: Tensor, mask: Tensor) -> Tensor:
    """MAE loss (He et al. 2022, §3): mean squared error per patch, averaged over the removed
    patches only,

        L = Σ_bl m_bl · (1/D) Σ_d (pred_bld − target_bld)²  /  Σ_bl m_bl,

    so predictions at visible patches (m = 0) do not count.

    Args:
        pred: (B, L, D) predicted pixels (or normalised pixels) of every patch.
        target: (B, L, D) the patches, or :func:`norm_pix_target` of them.
        mask: (B, L) bool, True = removed (from :func:`fewshot.data.masking.mae_shuffle`);
            at least one True.
    """
    _check_pair("masked_patch_loss", pred, target)
    if pred.ndim != 3:
        raise ValueError(f"masked_patch_loss: pred must be (B, L, D), got shape {_shape(pred)}")
    if not isinstance(mask, Tensor) or mask.shape != pred.shape[:2] or mask.dtype != torch.bool:
        raise ValueError(f"masked_patch_loss: mask must be a bool (B, L) tensor {tuple(pred.shape[:2])}, got {_shape(mask)}")
    if not mask.any():
        raise ValueError("masked_patch_loss: the mask removes no patch, so there is nothing to score")
    per_patch = (pred - target).pow(2).mean(dim=-1)
    m = mask.to(per_patch.dtype)
    return (per_patch * m).sum() / m.sum()
