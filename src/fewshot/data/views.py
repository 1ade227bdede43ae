"""Two-view augmentation recipes for contrastive pre-training, applied to whole batches.

A recipe turns a batch ``x`` of shape (B, C, H, W), float32 in [0, 1] with the foreground
bright, into a batch of random views of shape (B, C, image_size, image_size), still in
[0, 1]. Each image gets its own random draw, but the work is done with batched tensor ops
(one ``grid_sample`` for all geometry, per-image parameter tensors for colour and blur), so
a batch of 256 small images costs a few milliseconds on a CPU. torchvision's v2 transforms
are not used for the random part because, handed a batch, they apply one draw to all of it;
its functional ops serve as references in the tests (per-image sigmas and factors do not
fit them, and grey as a batched matmul is cheaper than rgb_to_grayscale plus a select).

Sampling is bilinear without antialiasing: inputs should already be about image_size
(resize once when loading); a large downscale here would alias.

Randomness: every random number is drawn on the CPU from the ``torch.Generator`` passed in
(the trainer owns and checkpoints it), in a fixed order that does not depend on the device,
so the same generator state gives the same views. Parameters are then moved to ``x.device``
and the image math runs there, so CUDA batches work too.

Recipes (see :func:`make_views`): ``"simclr"``, ``"characters"``, ``"none"`` and the learned
``"viewmaker"`` (:mod:`fewshot.data.viewmaker`).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fewshot.errors import ConfigError

__all__ = [
    "VIEW_RECIPES",
    "CharacterViews",
    "IdentityViews",
    "SimCLRViews",
    "ViewRecipe",
    "make_views",
]

# Luma weights of torchvision's rgb_to_grayscale; saturation and contrast use the same grey.
_GRAY = (0.2989, 0.587, 0.114)

# RGB -> YIQ (NTSC). Hue is rotated about the Y (grey) axis in this space.
_RGB_TO_YIQ = torch.tensor(
    [[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]], dtype=torch.float64
)
_YIQ_TO_RGB = torch.linalg.inv(_RGB_TO_YIQ)


# --------------------------------------------------------------------------- option checks


def _number(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"view option {name} must be a finite number, got {value!r}")
    return float(value)


def _prob(name: str, value: object) -> float:
    p = _number(name, value)
    if not 0.0 <= p <= 1.0:
        raise ConfigError(f"view option {name} must be a probability in [0, 1], got {value!r}")
    return p


def _interval(
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
        v = _number(name, value)
        if symmetric:
            if v < 0:
                raise ConfigError(f"view option {name} must be >= 0 (it means ±{name}), got {value!r}")
            lo, hi = -v, v
        else:
            lo, hi = v, v
    elif isinstance(value, Sequence) and not isinstance(value, str) and len(value) == 2:
        lo, hi = _number(name, value[0]), _number(name, value[1])
    else:
        raise ConfigError(f"view option {name} must be a number or a (low, high) pair, got {value!r}")
    if lo > hi:
        raise ConfigError(f"view option {name} must have low <= high, got {value!r}")
    if positive and lo <= 0:
        raise ConfigError(f"view option {name} must be > 0, got {value!r}")
    if (low is not None and lo < low) or (high is not None and hi > high):
        raise ConfigError(f"view option {name} must lie in [{low}, {high}], got {value!r}")
    return lo, hi


def _check_batch(x: Tensor, generator: torch.Generator) -> None:
    if not isinstance(x, Tensor) or x.ndim != 4 or not x.is_floating_point():
        shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"views need a float (B, C, H, W) batch, got {shape}")
    if not isinstance(generator, torch.Generator) or generator.device.type != "cpu":
        raise ValueError("views need a CPU torch.Generator (parameters are drawn on the CPU)")


class _Draws:
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


def _ship(x: Tensor, *params: Tensor) -> list[Tensor]:
    """Move per-image CPU parameters to x's device and dtype in one copy."""
    sizes = [p[0].numel() for p in params]
    flat = torch.cat([p.reshape(p.shape[0], -1) for p in params], dim=1).to(x.device, x.dtype)
    return [t.reshape(params[i].shape) for i, t in enumerate(flat.split(sizes, dim=1))]


# ------------------------------------------------------------------------ geometric pieces

_CROP_TRIES = 10  # torchvision's RandomResizedCrop also gives up after 10 tries


def _sample_crops(
    d: _Draws, scale: tuple[float, float], ratio: tuple[float, float], aspect: float
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Random-resized-crop boxes as (half-width, half-height, centre x, centre y) in [-1, 1] coords.

    Area fraction ~ U(scale), log aspect ratio ~ U(log ratio), as in torchvision's
    RandomResizedCrop; boxes that do not fit are rejected, up to 10 tries per image, after
    which the whole image is used. ``aspect`` is H / W of the input.
    """
    area = d.uniform(*scale, k=_CROP_TRIES)
    r = torch.exp(d.uniform(math.log(ratio[0]), math.log(ratio[1]), k=_CROP_TRIES))
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


def _affine_theta(
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


def _elastic_offsets(noise: Tensor, size: int, magnitude: Tensor) -> Tensor:
    """Smooth random displacement fields (B, size, size, 2) in [-1, 1] grid units.

    Simard et al. (2003) blur white noise with a Gaussian; we draw the noise on a coarse
    (B, 2, g, g) lattice and upsample it bicubically, which gives a comparably smooth field
    for one interpolate call per batch. ``magnitude`` (B,) scales each image's field.
    """
    field = F.interpolate(noise, size=(size, size), mode="bicubic", align_corners=False)
    return field.permute(0, 2, 3, 1) * magnitude.view(-1, 1, 1, 1)


def _warp(x: Tensor, theta: Tensor, size: int, padding_mode: str = "zeros", offsets: Tensor | None = None) -> Tensor:
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


def _dilate3(x: Tensor) -> Tensor:
    """3×3 grey-level dilation (max filter) as separable shifted maxima.

    Same result as F.max_pool2d(x, 3, 1, 1) for x >= 0, but several times faster on a CPU
    for one-channel batches. Zero padding is neutral because x >= 0.
    """
    p = F.pad(x, (1, 1, 1, 1))
    h = torch.maximum(torch.maximum(p[..., :-2], p[..., 1:-1]), p[..., 2:])
    return torch.maximum(torch.maximum(h[..., :-2, :], h[..., 1:-1, :]), h[..., 2:, :])


def _stroke_thickness(x: Tensor, t: Tensor) -> Tensor:
    """Thicken (t > 0) or thin (t < 0) bright strokes by |t| ∈ [0, 1] per image.

    The image is blended towards its 3×3 dilation or erosion by |t| rather than replaced:
    at 28×28 Omniglot strokes are only 1–2 px wide and a full erosion would wipe them out.
    Erosion is computed as 1 - dilate(1 - x), so one dilation pass serves both kinds
    (for x in [0, 1], 1 - dilate(1 - x) is the 3×3 min filter with neutral padding).
    """
    t = t.view(-1, 1, 1, 1)
    sign = torch.where(t < 0, -1.0, 1.0).to(x.dtype)
    offset = (t < 0).to(x.dtype)
    target = torch.addcmul(offset, sign, _dilate3(torch.addcmul(offset, sign, x)))
    return torch.lerp(x, target, t.abs())


def _erase(x: Tensor, top: Tensor, left: Tensor, height: Tensor, width: Tensor) -> Tensor:
    """Set one box per image to 0 (background); (B,) integer tensors, height 0 = no box."""
    rows = torch.arange(x.shape[-2], device=x.device)
    cols = torch.arange(x.shape[-1], device=x.device)
    in_rows = (rows >= top[:, None]) & (rows < (top + height)[:, None])
    in_cols = (cols >= left[:, None]) & (cols < (left + width)[:, None])
    return x.masked_fill((in_rows[:, :, None] & in_cols[:, None, :])[:, None], 0.0)


# --------------------------------------------------------------------------- colour pieces


def _colour_matrices(saturation: Tensor, hue: Tensor) -> Tensor:
    """(B, 3, 3) RGB matrices: saturation blend with grey, then a hue rotation.

    Saturation s: s·x + (1 - s)·grey(x), as torchvision's adjust_saturation. Hue
    h ∈ [-0.5, 0.5] turns the chroma plane (I, Q) of YIQ by 2πh about the grey axis: one
    linear map, unlike torchvision's HSV round trip, so it approximates the HSV hue shift
    while keeping luma exactly. Written as I + YIQ⁻¹ (R - I) YIQ so that h = 0 gives exactly
    the identity (s = 1 does too).
    """
    s = saturation.double().view(-1, 1, 1)
    grey = torch.tensor(_GRAY, dtype=torch.float64).expand(3, 3)
    eye = torch.eye(3, dtype=torch.float64)
    sat = s * eye + (1 - s) * grey
    # Negative angle: with this YIQ matrix that turns red towards yellow for h > 0, the
    # same direction as torchvision's adjust_hue.
    a = -2 * math.pi * hue.double()
    c, sn = torch.cos(a) - 1, torch.sin(a)
    rot = torch.zeros(hue.shape[0], 3, 3, dtype=torch.float64)
    rot[:, 1, 1], rot[:, 1, 2], rot[:, 2, 1], rot[:, 2, 2] = c, -sn, sn, c
    hue_m = eye + _YIQ_TO_RGB @ rot @ _RGB_TO_YIQ
    return (hue_m @ sat).float()


def _jitter(x: Tensor, brightness: Tensor, contrast: Tensor, colour: Tensor | None) -> Tensor:
    """Brightness, then contrast, then (3 channels) a colour matrix, per image.

    brightness f: clamp(f·x), as torchvision's adjust_brightness. contrast c: blend with
    the mean of the image's grey version, c·y + (1 - c)·mean, as adjust_contrast. colour:
    (B, 3, 3) from :func:`_colour_matrices`. Contrast is affine, so for 3 channels it is
    folded into the colour matrix, M(c·y + (1 - c)·m) = (c·M)·y + (1 - c)·m·(M·1): one
    batched matmul (baddbmm) for contrast, saturation and hue. Unlike torchvision there is
    no clamp between contrast and saturation/hue; the result is clamped once at the end.
    brightness = contrast = 1 and colour = I leave x exactly unchanged.
    """
    b, c, h, w = x.shape
    y = (x * brightness.view(-1, 1, 1, 1)).clamp_(0.0, 1.0)
    means = y.mean(dim=(2, 3))
    grey_mean = means @ means.new_tensor(_GRAY) if c == 3 else means.mean(dim=1)
    k = contrast.view(-1, 1)
    if colour is None:
        bias = ((1 - k) * grey_mean.view(-1, 1)).view(-1, 1, 1, 1)
        return torch.addcmul(bias, k.view(-1, 1, 1, 1), y).clamp_(0.0, 1.0)
    bias = ((1 - k) * grey_mean.view(-1, 1)) * colour.sum(dim=2)  # (B, 3)
    out = torch.baddbmm(bias.unsqueeze(2), colour * k.view(-1, 1, 1), y.reshape(b, c, h * w))
    return out.reshape(b, c, h, w).clamp_(0.0, 1.0)


def _gaussian_kernels(sigma: Tensor, size: int) -> Tensor:
    """(B, size) normalised 1-D Gaussian kernels, the same taps as torchvision's gaussian_blur."""
    half = (size - 1) / 2
    xs = torch.linspace(-half, half, size, dtype=sigma.dtype)
    pdf = torch.exp(-0.5 * (xs / sigma[:, None]) ** 2)
    return pdf / pdf.sum(dim=1, keepdim=True)


def _blur(x: Tensor, kernels: Tensor) -> Tensor:
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


# ------------------------------------------------------------------------------- recipes


class ViewRecipe(nn.Module):
    """Base class: ``recipe(x, generator)`` gives one random view of every image in x.

    Subclasses implement ``forward(x, generator)``. All randomness comes from the CPU
    generator passed in. Hand-made recipes hold no tensors; a learned one (the viewmaker) keeps
    its weights as parameters, which the method that holds it as ``.views`` trains and checkpoints.
    """

    name: str = ""

    def __init__(self, image_size: int) -> None:
        super().__init__()
        if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
            raise ConfigError(f"image_size must be a positive int, got {image_size!r}")
        self.image_size = image_size

    def forward(self, x: Tensor, generator: torch.Generator) -> Tensor:  # pragma: no cover
        raise NotImplementedError

    def two_views(self, x: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """Two independently drawn views of x.

        The batch is duplicated and augmented in one pass (twice the images, half the op
        launches), so this is not the same draw as calling the recipe twice.
        """
        _check_batch(x, generator)
        v = self(torch.cat([x, x]), generator)
        return v[: x.shape[0]], v[x.shape[0] :]


class IdentityViews(ViewRecipe):
    """``"none"``: no augmentation (evaluation, baselines).

    Returns x itself (not a copy) when it is already image_size × image_size; otherwise
    resizes it (bilinear, antialiased). Draws nothing from the generator.
    """

    name = "none"

    def extra_repr(self) -> str:
        return f"image_size={self.image_size}"

    def forward(self, x: Tensor, generator: torch.Generator) -> Tensor:
        _check_batch(x, generator)
        if x.shape[-2:] == (self.image_size, self.image_size):
            return x
        size = (self.image_size, self.image_size)
        return F.interpolate(x, size=size, mode="bilinear", antialias=True, align_corners=False).clamp_(0, 1)


class SimCLRViews(ViewRecipe):
    """``"simclr"``: the SimCLR augmentation for photos (Chen et al. 2020, ICML, appendix A).

    In order, per image:

    1. random resized crop to image_size: area fraction ~ U(crop_scale) (paper: 0.08–1),
       aspect ratio log-uniform in crop_ratio (paper: 3/4–4/3); then a horizontal flip with
       probability hflip_prob (0.5). Crop and flip are one grid_sample.
    2. with probability jitter_prob (paper: 0.8) colour jitter of strength ``strength``
       (paper's s, default 1.0): brightness and contrast factors ~ U(max(0, 1 - 0.8s),
       1 + 0.8s), saturation likewise, hue shift ~ U(-0.2s, 0.2s) (capped at ±0.5).
       Applied in the fixed order brightness, contrast, saturation, hue; torchvision's
       ColorJitter shuffles the order on every call, which we do not: a per-image order
       would cost one pass per order, and the fixed order lets contrast, saturation and
       hue share one batched matmul (see :func:`_jitter`). Hue is a YIQ rotation
       (see :func:`_colour_matrices`), an approximation of the HSV hue shift.
    3. with probability grayscale_prob (paper: 0.2) conversion to grey (torchvision's
       luma weights, as a 3×3 matrix per image).
    4. with probability blur_prob (paper: 0.5) Gaussian blur, sigma ~ U(blur_sigma)
       (paper: 0.1–2.0), kernel about 10% of image_size, odd: 2·⌊⌊size/10⌋/2⌋ + 1, at
       least 3 (23 at 224 px, 3 at 28–39 px), as in the SimCLR reference code.

    For one-channel images saturation, hue and grayscale are skipped (brightness and
    contrast stay). Crops never leave the image, so padding does not matter (border
    padding guards rounding). The paper's recipe targets 224 px ImageNet photos; for
    small images a weaker setting (e.g. strength=0.5, blur_prob=0) may suit better.
    """

    name = "simclr"

    def __init__(
        self,
        image_size: int,
        *,
        crop_scale: Sequence[float] = (0.08, 1.0),
        crop_ratio: Sequence[float] = (3 / 4, 4 / 3),
        hflip_prob: float = 0.5,
        strength: float = 1.0,
        jitter_prob: float = 0.8,
        grayscale_prob: float = 0.2,
        blur_prob: float = 0.5,
        blur_sigma: Sequence[float] = (0.1, 2.0),
    ) -> None:
        super().__init__(image_size)
        self.crop_scale = _interval("crop_scale", crop_scale, high=1.0, positive=True)
        self.crop_ratio = _interval("crop_ratio", crop_ratio, positive=True)
        self.hflip_prob = _prob("hflip_prob", hflip_prob)
        self.strength = _number("strength", strength)
        if self.strength < 0:
            raise ConfigError(f"view option strength must be >= 0, got {strength!r}")
        self.jitter_prob = _prob("jitter_prob", jitter_prob)
        self.grayscale_prob = _prob("grayscale_prob", grayscale_prob)
        self.blur_prob = _prob("blur_prob", blur_prob)
        self.blur_sigma = _interval("blur_sigma", blur_sigma, positive=True)
        self.blur_kernel = max(2 * ((image_size // 10) // 2) + 1, 3)

    def extra_repr(self) -> str:
        return (
            f"image_size={self.image_size}, crop_scale={self.crop_scale}, crop_ratio={self.crop_ratio}, "
            f"hflip_prob={self.hflip_prob}, strength={self.strength}, jitter_prob={self.jitter_prob}, "
            f"grayscale_prob={self.grayscale_prob}, blur_prob={self.blur_prob}, blur_sigma={self.blur_sigma}"
        )

    def forward(self, x: Tensor, generator: torch.Generator) -> Tensor:
        _check_batch(x, generator)
        b, c, h, w = x.shape
        if c not in (1, 3):
            raise ValueError(f"the simclr views need 1 or 3 channels, got {c}")
        # All draws happen here, in a fixed layout, whatever the channels or device.
        d = _Draws(b, 2 * _CROP_TRIES + 2 + 9, generator)
        cw, ch, cx, cy = _sample_crops(d, self.crop_scale, self.crop_ratio, aspect=h / w)
        flip = torch.where(d.take() < self.hflip_prob, -1.0, 1.0).double()
        jitter = d.take() < self.jitter_prob
        j = 0.8 * self.strength
        lo = max(0.0, 1.0 - j)
        one = torch.ones(())
        bright = torch.where(jitter, d.uniform(lo, 1.0 + j), one)
        contrast = torch.where(jitter, d.uniform(lo, 1.0 + j), one)
        sat = torch.where(jitter, d.uniform(lo, 1.0 + j), one)
        hmax = min(0.2 * self.strength, 0.5)
        hue = torch.where(jitter, d.uniform(-hmax, hmax), torch.zeros(()))
        grey = d.take() < self.grayscale_prob
        blur = d.take() < self.blur_prob
        sigma = d.uniform(*self.blur_sigma)

        zero = torch.zeros(b, dtype=torch.float64)
        theta = _affine_theta(cw, ch, cx, cy, flip, zero, zero, zero + 1, zero, zero)
        # Unjittered images have brightness = contrast = sat = 1, hue = 0: exactly no change.
        colour = _colour_matrices(sat, hue) if c == 3 else torch.eye(3).expand(b, 3, 3)
        grey_m = torch.where(grey[:, None, None], torch.tensor(_GRAY).expand(3, 3), torch.eye(3))
        theta_d, bright_d, contrast_d, colour_d, grey_d = _ship(x, theta, bright, contrast, colour, grey_m)

        out = _warp(x, theta_d, self.image_size, padding_mode="border")
        if bool(jitter.any()):
            out = _jitter(out, bright_d, contrast_d, colour_d if c == 3 else None)
        if c == 3 and bool(grey.any()):
            # Grey as a matrix (rows = luma weights; identity for the others): one bmm, the
            # same values as torchvision's rgb_to_grayscale and cheaper than it plus a where.
            out = torch.bmm(grey_d, out.reshape(b, 3, -1)).reshape(out.shape)
        if bool(blur.any()):
            # Only the images drawn for blurring: half the work at blur_prob = 0.5.
            idx = blur.nonzero()[:, 0]
            kernels = _gaussian_kernels(sigma[idx], self.blur_kernel).to(x.device, x.dtype)
            if idx.numel() == b:
                out = _blur(out, kernels)
            else:
                idx = idx.to(x.device)
                out = out.index_copy(0, idx, _blur(out.index_select(0, idx), kernels))
        return out.clamp_(0.0, 1.0)


class CharacterViews(ViewRecipe):
    """``"characters"``: views of handwritten strokes (Omniglot, digits), bright ink on black.

    Per image: a random crop-and-resize and a random affine map (shear, zoom, rotation,
    translation), composed into one 2×3 matrix and applied with a single grid_sample for
    the batch (zero padding = background); then a random stroke-thickness change; then,
    optionally, random erasing of one box. No colour changes and, by default, no flips:
    characters are not mirror-symmetric and a mirrored letter can be another letter.

    Defaults are our choice, not tuned; they sit in the range of the affine distortions
    Koch et al. (2015, "Siamese neural networks for one-shot image recognition") used on
    Omniglot (rotation ±10°, shear ±0.3 rad, zoom 0.8–1.2, a few pixels of translation).

    Options (a single number means ±number for rotation, shear and translate):

    - rotation=15: degrees, uniform in ±15 (counter-clockwise positive); pen-hand and
      paper tilt. A (lo, hi) pair fixes the range, e.g. (90, 90).
    - shear=10: degrees of x-shear (slant), uniform in ±10.
    - translate=0.1: shift up to 10% of the image size in x and in y (as torchvision's
      RandomAffine translate).
    - scale=(0.9, 1.1): zoom factor about the centre.
    - crop_scale=(0.6, 1.0): area fraction of the random crop that is resized to
      image_size; milder than SimCLR's 0.08 because a small crop of a character may hold
      no ink at all.
    - crop_ratio=(3/4, 4/3): crop aspect ratio, log-uniform (as RandomResizedCrop).
    - hflip_prob=0.0: probability of a left-right mirror.
    - thickness_prob=0.5: probability of a stroke-thickness change; the change blends the
      image towards its 3×3 dilation or erosion (equally likely) by a factor ~ U(0,
      thickness). Different drawers use different pens.
    - thickness=1.0: largest blend factor, in [0, 1].
    - elastic_prob=0.5, elastic=0.04, elastic_grid=4: probability, strength and lattice of
      an elastic distortion (Simard et al. 2003, the classic handwriting augmentation): a
      smooth random displacement field with per-pixel std ≈ elastic × image size / 2 (about
      0.5 px at 28 px) added to the sampling grid. It imitates what an affine map cannot:
      one drawer's stroke bending differently from another's.
    - erase_prob=0.0: probability of blanking one box (set to background 0).
    - erase_scale=(0.02, 0.33), erase_ratio=(0.3, 3.3): its area fraction and aspect
      ratio, torchvision's RandomErasing defaults.
    """

    name = "characters"

    def __init__(
        self,
        image_size: int,
        *,
        rotation: float | Sequence[float] = 15.0,
        shear: float | Sequence[float] = 10.0,
        translate: float = 0.1,
        scale: float | Sequence[float] = (0.9, 1.1),
        crop_scale: Sequence[float] = (0.6, 1.0),
        crop_ratio: Sequence[float] = (3 / 4, 4 / 3),
        hflip_prob: float = 0.0,
        thickness_prob: float = 0.5,
        thickness: float = 1.0,
        elastic_prob: float = 0.5,
        elastic: float = 0.04,
        elastic_grid: int = 4,
        erase_prob: float = 0.0,
        erase_scale: Sequence[float] = (0.02, 0.33),
        erase_ratio: Sequence[float] = (0.3, 3.3),
    ) -> None:
        super().__init__(image_size)
        self.elastic_prob = _prob("elastic_prob", elastic_prob)
        self.elastic = _number("elastic", elastic)
        if not 0.0 <= self.elastic <= 0.5:
            raise ConfigError(f"view option elastic must be in [0, 0.5], got {elastic!r}")
        if not isinstance(elastic_grid, int) or elastic_grid < 2:
            raise ConfigError(f"view option elastic_grid must be an integer ≥ 2, got {elastic_grid!r}")
        self.elastic_grid = elastic_grid
        self.rotation = _interval("rotation", rotation, symmetric=True)
        self.shear = _interval("shear", shear, symmetric=True, low=-80.0, high=80.0)
        self.translate = _number("translate", translate)
        if not 0.0 <= self.translate <= 1.0:
            raise ConfigError(f"view option translate must be in [0, 1], got {translate!r}")
        self.scale = _interval("scale", scale, positive=True)
        self.crop_scale = _interval("crop_scale", crop_scale, high=1.0, positive=True)
        self.crop_ratio = _interval("crop_ratio", crop_ratio, positive=True)
        self.hflip_prob = _prob("hflip_prob", hflip_prob)
        self.thickness_prob = _prob("thickness_prob", thickness_prob)
        self.thickness = _prob("thickness", thickness)
        self.erase_prob = _prob("erase_prob", erase_prob)
        self.erase_scale = _interval("erase_scale", erase_scale, high=1.0, positive=True)
        self.erase_ratio = _interval("erase_ratio", erase_ratio, positive=True)

    def extra_repr(self) -> str:
        return (
            f"image_size={self.image_size}, rotation={self.rotation}, shear={self.shear}, "
            f"translate={self.translate}, scale={self.scale}, crop_scale={self.crop_scale}, "
            f"crop_ratio={self.crop_ratio}, hflip_prob={self.hflip_prob}, "
            f"thickness_prob={self.thickness_prob}, thickness={self.thickness}, "
            f"elastic_prob={self.elastic_prob}, elastic={self.elastic}, elastic_grid={self.elastic_grid}, "
            f"erase_prob={self.erase_prob}, erase_scale={self.erase_scale}, erase_ratio={self.erase_ratio}"
        )

    def forward(self, x: Tensor, generator: torch.Generator) -> Tensor:
        _check_batch(x, generator)
        b, _, h, w = x.shape
        s = self.image_size
        d = _Draws(b, 2 * _CROP_TRIES + 2 + 15, generator)
        cw, ch, cx, cy = _sample_crops(d, self.crop_scale, self.crop_ratio, aspect=h / w)
        flip = torch.where(d.take() < self.hflip_prob, -1.0, 1.0).double()
        angle = d.uniform(*self.rotation)
        shear = d.uniform(*self.shear)
        zoom = d.uniform(*self.scale)
        tx = d.uniform(-2 * self.translate, 2 * self.translate)  # [-1, 1] spans 2 units
        ty = d.uniform(-2 * self.translate, 2 * self.translate)
        thick = d.take() < self.thickness_prob
        amount = d.uniform(0.0, self.thickness) * torch.where(d.take() < 0.5, -1.0, 1.0)
        amount = torch.where(thick, amount, torch.zeros(()))
        erase = d.take() < self.erase_prob
        area = d.uniform(*self.erase_scale) * s * s
        ratio = torch.exp(d.uniform(math.log(self.erase_ratio[0]), math.log(self.erase_ratio[1])))
        eh = torch.sqrt(area * ratio).round().clamp(1, s).long()
        ew = torch.sqrt(area / ratio).round().clamp(1, s).long()
        top = (d.take() * (s - eh + 1)).floor().long()
        left = (d.take() * (s - ew + 1)).floor().long()
        eh = torch.where(erase, eh, torch.zeros((), dtype=torch.long))

        theta = _affine_theta(cw, ch, cx, cy, flip, angle, shear, zoom, tx, ty)
        offsets = None
        if self.elastic > 0 and self.elastic_prob > 0:
            # Drawn after the uniform block, so the other parameters do not depend on these options.
            strength = torch.where(d.take() < self.elastic_prob, self.elastic, 0.0)
            noise = torch.randn(b, 2, self.elastic_grid, self.elastic_grid, generator=generator, dtype=torch.float64)
            noise_d, strength_d = _ship(x, noise, strength)
            offsets = _elastic_offsets(noise_d, s, strength_d)
        theta_d, amount_d = _ship(x, theta, amount)
        out = _warp(x, theta_d, s, padding_mode="zeros", offsets=offsets)
        if bool(thick.any()):
            out = _stroke_thickness(out, amount_d)
        if bool(erase.any()):
            boxes = torch.stack([top, left, eh, ew]).to(x.device)
            out = _erase(out, *boxes)
        return out.clamp_(0.0, 1.0)


# ------------------------------------------------------------------------------ registry

_RECIPES: dict[str, type[ViewRecipe]] = {
    "simclr": SimCLRViews,
    "characters": CharacterViews,
    "none": IdentityViews,
}

VIEW_RECIPES: list[str] = list(_RECIPES)


def make_views(name: str, image_size: int, channels: int | None = None, **options: object) -> ViewRecipe:
    """The view recipe called ``name`` (one of VIEW_RECIPES) producing image_size² views.

    ``channels`` (the data's) goes to recipes that build layers for it (the viewmaker).
    Unknown names and options raise ConfigError; so do out-of-range option values.
    """
    cls = _RECIPES.get(name) if isinstance(name, str) else None
    if cls is None:
        raise ConfigError(f"unknown view recipe {name!r}; known recipes: {', '.join(VIEW_RECIPES)}")
    params = inspect.signature(cls.__init__).parameters
    if channels is not None and "channels" in params:
        options = {**options, "channels": channels}
    accepted = [p for p in params if p not in ("self", "image_size")]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise ConfigError(
            f"unknown option(s) {', '.join(unknown)} for view recipe {name!r}; "
            f"accepted: {', '.join(accepted) if accepted else 'none'}"
        )
    return cls(image_size, **options)


# Registers "viewmaker" in _RECIPES; at the end, because it subclasses ViewRecipe from above.
import fewshot.data.viewmaker  # noqa: E402,F401
