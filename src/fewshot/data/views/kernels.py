"""The batched pieces view recipes are made of: option checks, per-image random draws, geometry
(crops, affine maps, elastic offsets, one ``grid_sample``), stroke thickness, erasing, colour and blur.

Every function takes a whole batch and per-image parameter tensors; randomness comes only from
the CPU generator the caller passes (see :mod:`fewshot.data.views`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from fewshot.errors import ConfigError

# Luma weights of torchvision's rgb_to_grayscale; saturation and contrast use the same grey.
GRAY = (0.2989, 0.587, 0.114)

# RGB -> YIQ (NTSC). Hue is rotated about the Y (grey) axis in this space.
RGB_TO_YIQ = torch.tensor(
    [[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]], dtype=torch.float64
)
YIQ_TO_RGB = torch.linalg.inv(RGB_TO_YIQ)


# --------------------------------------------------------------------------- option checks


def check_number(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"view option {name} must be a finite number, got {value!r}")
    return float(value)


def check_probability(name: str, value: object) -> float:
    p = check_number(name, value)
    if not 0.0 <= p <= 1.0:
        raise ConfigError(f"view option {name} must be a probability in [0, 1], got {value!r}")
    return p


def check_interval(
    name: str,
    value: object,
    *,
    symmetric: bool = False,
    low: float | None = None,
    high: float | None = None,
    positive: bool = False,
) -> tuple[float, float]:
    """A (lo, hi) range from a pair, or from one number: (-v, v) if ``symmetric`` else (v, v)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        v = check_number(name, value)
        if symmetric:
            if v < 0:
                raise ConfigError(f"view option {name} must be >= 0 (it means ±{name}), got {value!r}")
            lo, hi = -v, v
        else:
            lo, hi = v, v
    elif isinstance(value, Sequence) and not isinstance(value, str) and len(value) == 2:
        lo, hi = check_number(name, value[0]), check_number(name, value[1])
    else:
        raise ConfigError(f"view option {name} must be a number or a (low, high) pair, got {value!r}")
    if lo > hi:
        raise ConfigError(f"view option {name} must have low <= high, got {value!r}")
    if positive and lo <= 0:
        raise ConfigError(f"view option {name} must be > 0, got {value!r}")
    if (low is not None and lo < low) or (high is not None and hi > high):
        raise ConfigError(f"view option {name} must lie in [{low}, {high}], got {value!r}")
    return lo, hi


def check_batch(x: Tensor, generator: torch.Generator) -> None:
    if not isinstance(x, Tensor) or x.ndim != 4 or not x.is_floating_point():
        shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"views need a float (B, C, H, W) batch, got {shape}")
    if not isinstance(generator, torch.Generator) or generator.device.type != "cpu":
        raise ValueError("views need a CPU torch.Generator (parameters are drawn on the CPU)")


class Draws:
    """Columns of one (B, n) uniform draw, handed out in a fixed order (one RNG call per batch)."""

    def __init__(self, batch: int, n: int, generator: torch.Generator) -> None:
        self.u = torch.rand(batch, n, generator=generator, dtype=torch.float64)
        self.i = 0

    def take(self, k: int = 1) -> Tensor:
        cols = self.u[:, self.i : self.i + k]
        self.i += k
        return cols if k > 1 else cols[:, 0]

    def uniform(self, lo: float, hi: float, k: int = 1) -> Tensor:
        return lo + (hi - lo) * self.take(k)


def ship_params(x: Tensor, *params: Tensor) -> list[Tensor]:
    """Move per-image CPU parameters to x's device and dtype in one copy."""
    sizes = [p[0].numel() for p in params]
    flat = torch.cat([p.reshape(p.shape[0], -1) for p in params], dim=1).to(x.device, x.dtype)
    return [t.reshape(params[i].shape) for i, t in enumerate(flat.split(sizes, dim=1))]


# ------------------------------------------------------------------------ geometric pieces

CROP_TRIES = 10  # torchvision's RandomResizedCrop also gives up after 10 tries


def sample_crops(
    d: Draws, scale: tuple[float, float], ratio: tuple[float, float], aspect: float
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Random-resized-crop boxes as (half-width, half-height, centre x, centre y) in [-1, 1] coords.

    Area fraction ~ U(scale), log aspect ratio ~ U(log ratio), as in torchvision's
    RandomResizedCrop; boxes that do not fit are rejected, up to 10 tries per image, after
    which the whole image is used. ``aspect`` is H / W of the input.
    """
    area = d.uniform(*scale, k=CROP_TRIES)
    r = torch.exp(d.uniform(math.log(ratio[0]), math.log(ratio[1]), k=CROP_TRIES))
    # Width and height as fractions of the input's width and height.
    cw = torch.sqrt(area * r * aspect)
    ch = torch.sqrt(area / (r * aspect))
    ok = (cw <= 1) & (ch <= 1)
    first = ok.to(torch.uint8).argmax(dim=1, keepdim=True)  # first accepted try
    found = ok.any(dim=1)
    one = torch.ones(())
    cw = torch.where(found, cw.gather(1, first)[:, 0], one)
    ch = torch.where(found, ch.gather(1, first)[:, 0], one)
    cx = (2 * d.take() - 1) * (1 - cw)
    cy = (2 * d.take() - 1) * (1 - ch)
    return cw, ch, cx, cy


def affine_theta(
    cw: Tensor,
    ch: Tensor,
    cx: Tensor,
    cy: Tensor,
    flip: Tensor,
    angle: Tensor,
    shear: Tensor,
    zoom: Tensor,
    tx: Tensor,
    ty: Tensor,
) -> Tensor:
    """The (B, 2, 3) output->input sampling matrices of crop, flip, then affine, composed.

    All arguments are (B,) tensors in normalised [-1, 1] coordinates (y points down):
    the crop box (half-sizes cw, ch and centre cx, cy); flip = -1 mirrors left-right, +1
    keeps; then the cropped image is sheared along x by ``shear`` degrees, zoomed by
    ``zoom``, rotated counter-clockwise (as displayed) by ``angle`` degrees about the
    centre, and shifted by (tx, ty). The forward map of that affine is A = zoom·R·Sh with
    R = [[cos, sin], [-sin, cos]] (counter-clockwise when y points down) and
    Sh = [[1, tan], [0, 1]]; the sampling grid needs its inverse, written out in closed form.
    """
    a = torch.deg2rad(angle.double())
    c, s = torch.cos(a), torch.sin(a)
    k = torch.tan(torch.deg2rad(shear.double()))
    z = zoom.double()
    # inverse(A) = (1/z) · [[1, -k], [0, 1]] · [[c, -s], [s, c]]
    i00, i01 = (c - k * s) / z, (-s - k * c) / z
    i10, i11 = s / z, c / z
    b0 = -(i00 * tx + i01 * ty)
    b1 = -(i10 * tx + i11 * ty)
    f = flip.double()
    theta = torch.stack(
        [cw * f * i00, cw * f * i01, cw * f * b0 + cx, ch * i10, ch * i11, ch * b1 + cy], dim=1
    )
    return theta.reshape(-1, 2, 3)


def elastic_offsets(noise: Tensor, size: int, magnitude: Tensor) -> Tensor:
    """Smooth random displacement fields (B, size, size, 2) in [-1, 1] grid units.

    Simard et al. (2003) blur white noise with a Gaussian; we draw the noise on a coarse
    (B, 2, g, g) lattice and upsample it bicubically, which gives a comparably smooth field
    for one interpolate call per batch. ``magnitude`` (B,) scales each image's field.
    """
    field = F.interpolate(noise, size=(size, size), mode="bicubic", align_corners=False)
    return field.permute(0, 2, 3, 1) * magnitude.view(-1, 1, 1, 1)


def warp(x: Tensor, theta: Tensor, size: int, padding_mode: str = "zeros", offsets: Tensor | None = None) -> Tensor:
    """Resample every image through its own 2×3 matrix: one grid, one grid_sample call.

    align_corners=False, so the identity matrix maps pixel centres onto pixel centres and
    a 90° turn of a square image does too (both are exact up to float rounding). The grid
    is built by broadcasting instead of F.affine_grid, which is ~4× slower on a CPU for
    small images (it goes through a batched matmul).
    """
    b = x.shape[0]
    lin = (torch.arange(size, device=x.device, dtype=x.dtype) * 2 + 1) / size - 1
    gx, gy = lin.view(1, 1, size), lin.view(1, size, 1)
    t = theta.reshape(b, 6, 1, 1)
    grid = torch.empty(b, size, size, 2, device=x.device, dtype=x.dtype)
    torch.add(t[:, 0] * gx, t[:, 1] * gy + t[:, 2], out=grid[..., 0])
    torch.add(t[:, 3] * gx, t[:, 4] * gy + t[:, 5], out=grid[..., 1])
    if offsets is not None:
        grid += offsets
    return F.grid_sample(x, grid, mode="bilinear", padding_mode=padding_mode, align_corners=False)


def dilate3(x: Tensor) -> Tensor:
    """3×3 grey-level dilation (max filter) as separable shifted maxima.

    Same result as F.max_pool2d(x, 3, 1, 1) for x >= 0, but several times faster on a CPU
    for one-channel batches. Zero padding is neutral because x >= 0.
    """
    p = F.pad(x, (1, 1, 1, 1))
    h = torch.maximum(torch.maximum(p[..., :-2], p[..., 1:-1]), p[..., 2:])
    return torch.maximum(torch.maximum(h[..., :-2, :], h[..., 1:-1, :]), h[..., 2:, :])


def stroke_thickness(x: Tensor, t: Tensor) -> Tensor:
    """Thicken (t > 0) or thin (t < 0) bright strokes by |t| ∈ [0, 1] per image.

    The image is blended towards its 3×3 dilation or erosion by |t| rather than replaced:
    at 28×28 Omniglot strokes are only 1–2 px wide and a full erosion would wipe them out.
    Erosion is computed as 1 - dilate(1 - x), so one dilation pass serves both kinds
    (for x in [0, 1], 1 - dilate(1 - x) is the 3×3 min filter with neutral padding).
    """
    t = t.view(-1, 1, 1, 1)
    sign = torch.where(t < 0, -1.0, 1.0).to(x.dtype)
    offset = (t < 0).to(x.dtype)
    target = torch.addcmul(offset, sign, dilate3(torch.addcmul(offset, sign, x)))
    return torch.lerp(x, target, t.abs().to(x.dtype))  # x is bf16 under CPU autocast (grid_sample)


def erase(x: Tensor, top: Tensor, left: Tensor, height: Tensor, width: Tensor) -> Tensor:
    """Set one box per image to 0 (background); (B,) integer tensors, height 0 = no box."""
    rows = torch.arange(x.shape[-2], device=x.device)
    cols = torch.arange(x.shape[-1], device=x.device)
    in_rows = (rows >= top[:, None]) & (rows < (top + height)[:, None])
    in_cols = (cols >= left[:, None]) & (cols < (left + width)[:, None])
    return x.masked_fill((in_rows[:, :, None] & in_cols[:, None, :])[:, None], 0.0)


# --------------------------------------------------------------------------- colour pieces


def colour_matrices(saturation: Tensor, hue: Tensor) -> Tensor:
    """(B, 3, 3) RGB matrices: saturation blend with grey, then a hue rotation.

    Saturation s: s·x + (1 - s)·grey(x), as torchvision's adjust_saturation. Hue
    h ∈ [-0.5, 0.5] turns the chroma plane (I, Q) of YIQ by 2πh about the grey axis: one
    linear map, unlike torchvision's HSV round trip, so it approximates the HSV hue shift
    while keeping luma exactly. Written as I + YIQ⁻¹ (R - I) YIQ so that h = 0 gives exactly
    the identity (s = 1 does too).
    """
    s = saturation.double().view(-1, 1, 1)
    grey = torch.tensor(GRAY, dtype=torch.float64).expand(3, 3)
    eye = torch.eye(3, dtype=torch.float64)
    sat = s * eye + (1 - s) * grey
    # Negative angle: with this YIQ matrix that turns red towards yellow for h > 0, the
    # same direction as torchvision's adjust_hue.
    a = -2 * math.pi * hue.double()
    c, sn = torch.cos(a) - 1, torch.sin(a)
    rot = torch.zeros(hue.shape[0], 3, 3, dtype=torch.float64)
    rot[:, 1, 1], rot[:, 1, 2], rot[:, 2, 1], rot[:, 2, 2] = c, -sn, sn, c
    hue_m = eye + YIQ_TO_RGB @ rot @ RGB_TO_YIQ
    return (hue_m @ sat).float()


def jitter(x: Tensor, brightness: Tensor, contrast: Tensor, colour: Tensor | None) -> Tensor:
    """Brightness, then contrast, then (3 channels) a colour matrix, per image.

    brightness f: clamp(f·x), as torchvision's adjust_brightness. contrast c: blend with
    the mean of the image's grey version, c·y + (1 - c)·mean, as adjust_contrast. colour:
    (B, 3, 3) from :func:`colour_matrices`. Contrast is affine, so for 3 channels it is
    folded into the colour matrix, M(c·y + (1 - c)·m) = (c·M)·y + (1 - c)·m·(M·1): one
    batched matmul (baddbmm) for contrast, saturation and hue. Unlike torchvision there is
    no clamp between contrast and saturation/hue; the result is clamped once at the end.
    brightness = contrast = 1 and colour = I leave x exactly unchanged.
    """
    b, c, h, w = x.shape
    y = (x * brightness.view(-1, 1, 1, 1)).clamp_(0.0, 1.0)
    means = y.mean(dim=(2, 3))
    grey_mean = means @ means.new_tensor(GRAY) if c == 3 else means.mean(dim=1)
    k = contrast.view(-1, 1)
    if colour is None:
        bias = ((1 - k) * grey_mean.view(-1, 1)).view(-1, 1, 1, 1)
        return torch.addcmul(bias, k.view(-1, 1, 1, 1), y).clamp_(0.0, 1.0)
    bias = ((1 - k) * grey_mean.view(-1, 1)) * colour.sum(dim=2)  # (B, 3)
    out = torch.baddbmm(bias.unsqueeze(2), colour * k.view(-1, 1, 1), y.reshape(b, c, h * w))
    return out.reshape(b, c, h, w).clamp_(0.0, 1.0)


def gaussian_kernels(sigma: Tensor, size: int) -> Tensor:
    """(B, size) normalised 1-D Gaussian kernels, the same taps as torchvision's gaussian_blur."""
    half = (size - 1) / 2
    xs = torch.linspace(-half, half, size, dtype=sigma.dtype)
    pdf = torch.exp(-0.5 * (xs / sigma[:, None]) ** 2)
    return pdf / pdf.sum(dim=1, keepdim=True)


def blur(x: Tensor, kernels: Tensor) -> Tensor:
    """Separable blur of each image with its own symmetric 1-D kernel (B, k), reflect padding.

    Same result as torchvision's gaussian_blur with each image's sigma. Written as sums of
    mirrored shifted copies (w_c·x + Σ_j w_j·(x_{-j} + x_{+j})): for the 3-tap kernels of
    small images this is ~2× faster on a CPU than a depthwise conv2d with B·C groups.
    """
    b, c, h, w = x.shape
    r = kernels.shape[1] // 2
    if r == 0:
        return x * kernels.to(x.dtype).view(b, 1, 1, 1)
    taps = kernels.to(x.dtype).view(b, -1, 1, 1, 1)
    p = F.pad(x, (r, r, r, r), mode="reflect")
    y = p[..., r : r + w] * taps[:, r]
    for j in range(1, r + 1):
        y.addcmul_(p[..., r - j : r - j + w] + p[..., r + j : r + j + w], taps[:, r + j])
    z = y[..., r : r + h, :] * taps[:, r]
    for j in range(1, r + 1):
        z.addcmul_(y[..., r - j : r - j + h, :] + y[..., r + j : r + j + h, :], taps[:, r + j])
    return z
