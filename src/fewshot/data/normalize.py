"""Character normalisation: centre each drawing on its ink and scale each axis to a fixed spread.

Two drawings of one character differ most in where the drawer put it, how big, and how wide or
tall (Omniglot: 20 drawers per character). Moment normalisation (as in classic handwriting
recognition, e.g. Casey 1970 "Moment normalization of handprinted characters") removes that
before anything else sees the image:

* the ink's centre of mass ``c = Σ_p I(p)·p / Σ_p I(p)`` goes to the image centre;
* each axis is scaled so the ink's standard deviation along it, ``σ_a = sqrt(Σ I·(p_a − c_a)² / Σ I)``,
  becomes ``spread · size`` output pixels, with the stretch capped (:func:`axis_scales`) so a thin
  stroke ("|", "—") is not blown up to fill the frame;
* the warp is sampled bilinearly at 4× the output size and area-averaged down to ``size`` (no
  aliasing of 2–3 px strokes), then optionally blurred with a Gaussian of ``blur`` output pixels.

The same functions serve images (:func:`normalize_characters`) and ink point sets
(:func:`normalize_points`), so the MHD baseline on normalised ink sees the same geometry.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from fewshot.errors import DataError

__all__ = ["axis_scales", "gaussian_blur", "ink_moments", "normalize_characters", "normalize_points"]

_SUPERSAMPLE = 4


def ink_moments(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Centre of mass and per-axis spread of the ink of each image.

    images: (N, C, H, W) with ink bright (channels are averaged). Coordinates are in input pixels,
    pixel (i, j) at its centre (i + 0.5, j + 0.5), ordered (row, col):
    c = Σ I·p / Σ I, σ_a = sqrt(Σ I·(p_a − c_a)² / Σ I). Returns (centre (N, 2), sigma (N, 2),
    mass (N,)); an image without ink gets its geometric centre and σ = 0.
    """
    ink = images.float().mean(1).clamp_min(0)  # (N, H, W)
    n, h, w = ink.shape
    rows = torch.arange(h, dtype=torch.float32) + 0.5
    cols = torch.arange(w, dtype=torch.float32) + 0.5
    mass = ink.sum((1, 2))
    safe = mass.clamp_min(1e-12)
    pr, pc = ink.sum(2), ink.sum(1)  # marginals (N, H), (N, W)
    cr = (pr * rows).sum(1) / safe
    cc = (pc * cols).sum(1) / safe
    vr = (pr * (rows[None] - cr[:, None]) ** 2).sum(1) / safe
    vc = (pc * (cols[None] - cc[:, None]) ** 2).sum(1) / safe
    empty = mass <= 1e-12
    centre = torch.stack([torch.where(empty, h / 2, cr), torch.where(empty, w / 2, cc)], 1)
    sigma = torch.stack([vr, vc], 1).sqrt() * (~empty)[:, None]
    return centre, sigma, mass


def axis_scales(sigma: torch.Tensor, target: float, max_stretch: float) -> torch.Tensor:
    """Per-axis scale factors s_a = target / max(σ_a, max_b σ_b / max_stretch).

    sigma: (N, 2). The wider axis is scaled to exactly ``target``; the other one too, unless it is
    more than ``max_stretch`` times narrower, in which case it is scaled as if it were σ_max /
    max_stretch (the aspect ratio changes by at most ``max_stretch``). max_stretch = 1 keeps the
    aspect ratio (one isotropic scale). An image without ink (σ = 0) gets scale 1.
    """
    if max_stretch < 1:
        raise DataError(f"max_stretch must be ≥ 1 (1 keeps the aspect ratio), got {max_stretch}")
    floor = sigma.amax(1, keepdim=True) / max_stretch
    eff = torch.maximum(sigma, floor)
    return torch.where(eff > 0, target / eff.clamp_min(1e-12), torch.ones_like(eff))


def gaussian_blur(images: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur, kernel exp(−x²/2σ²) normalised to sum 1, radius ceil(3σ), zero padding."""
    if sigma <= 0:
        return images
    radius = max(1, math.ceil(3 * sigma))
    x = torch.arange(-radius, radius + 1, dtype=images.dtype)
    k = torch.exp(-(x**2) / (2 * sigma**2))
    k = k / k.sum()
    c = images.shape[1]
    out = F.conv2d(images, k.view(1, 1, 1, -1).expand(c, 1, 1, -1), padding=(0, radius), groups=c)
    return F.conv2d(out, k.view(1, 1, -1, 1).expand(c, 1, -1, 1), padding=(radius, 0), groups=c)


def normalize_characters(
    images: torch.Tensor, size: int, spread: float = 0.15, max_stretch: float = 2.0, blur: float = 0.0
) -> torch.Tensor:
    """Moment-normalised characters (N, C, size, size) from images (N, C, H, W) at any resolution.

    Output pixel q (continuous coordinates, centre size/2) samples input point
    p = c + (q − size/2) / s with s_a = axis_scales(σ, spread·size, max_stretch) (output pixels per
    input pixel), so the ink's centre lands on the centre and its spread on ``spread·size``.
    Sampled bilinearly at 4× ``size``, area-averaged to ``size``, then :func:`gaussian_blur` (σ = blur
    output pixels). Ink pushed outside the frame is cut off.
    """
    if images.ndim != 4:
        raise DataError(f"normalize_characters takes images (N, C, H, W), got shape {tuple(images.shape)}")
    if not 0 < spread < 0.5:
        raise DataError(f"normalisation spread must lie in (0, 0.5) of the image size, got {spread}")
    n, c, h, w = images.shape
    images = images.float()
    if n == 0:
        return images.new_zeros(0, c, size, size)
    centre, sigma, _ = ink_moments(images)
    # Scales in output pixels per input pixel, with the input's aspect (non-square inputs) kept.
    s = axis_scales(sigma, spread * size, max_stretch)
    empty = sigma.amax(1) == 0
    s[empty] = torch.tensor([size / h, size / w])[None].expand(int(empty.sum()), 2)
    # grid_sample coordinates (align_corners=False): input x_norm = 2p/W − 1, output u = 2q/size − 1.
    # p = c + (q − size/2)/s  ⇒  x_norm = (2c/W − 1) + u · size / (s · W)   (per axis).
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0] = size / (s[:, 1] * w)  # x (columns)
    theta[:, 0, 2] = 2 * centre[:, 1] / w - 1
    theta[:, 1, 1] = size / (s[:, 0] * h)  # y (rows)
    theta[:, 1, 2] = 2 * centre[:, 0] / h - 1
    big = size * _SUPERSAMPLE
    grid = F.affine_grid(theta, [n, c, big, big], align_corners=False)
    warped = F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    out = F.avg_pool2d(warped, _SUPERSAMPLE)
    return gaussian_blur(out, blur).clamp_(0.0, 1.0)


def normalize_points(
    points: torch.Tensor, spread_px: float, max_stretch: float = 2.0, weights: torch.Tensor | None = None
) -> torch.Tensor:
    """Ink coordinates (P, 2) centred on their (weighted) mean and scaled per axis to spread ``spread_px``:
    p' = (p − c) ⊙ s with s = axis_scales(σ, spread_px, max_stretch), c and σ the weighted mean and
    standard deviation of the points (weights default to 1)."""
    if points.ndim != 2 or points.shape[1] != 2:
        raise DataError(f"normalize_points takes points (P, 2), got shape {tuple(points.shape)}")
    if len(points) == 0:
        return points.float()
    p = points.float()
    wgt = torch.ones(len(p)) if weights is None else weights.float()
    wgt = wgt / wgt.sum()
    c = (wgt[:, None] * p).sum(0)
    sigma = (wgt[:, None] * (p - c) ** 2).sum(0).sqrt()
    return (p - c) * axis_scales(sigma[None], spread_px, max_stretch)[0]
