"""The hand-made view recipes: ``none`` (identity), ``simclr`` (photos) and ``characters`` (handwriting)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fewshot.data.views import kernels
from fewshot.errors import ConfigError

__all__ = ["CharacterViews", "IdentityViews", "SimCLRViews", "ViewRecipe"]


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
        kernels.check_batch(x, generator)
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
        kernels.check_batch(x, generator)
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
       hue share one batched matmul (see :func:`kernels.jitter`). Hue is a YIQ rotation
       (see :func:`kernels.colour_matrices`), an approximation of the HSV hue shift.
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
        self.crop_scale = kernels.check_interval("crop_scale", crop_scale, high=1.0, positive=True)
        self.crop_ratio = kernels.check_interval("crop_ratio", crop_ratio, positive=True)
        self.hflip_prob = kernels.check_probability("hflip_prob", hflip_prob)
        self.strength = kernels.check_number("strength", strength)
        if self.strength < 0:
            raise ConfigError(f"view option strength must be >= 0, got {strength!r}")
        self.jitter_prob = kernels.check_probability("jitter_prob", jitter_prob)
        self.grayscale_prob = kernels.check_probability("grayscale_prob", grayscale_prob)
        self.blur_prob = kernels.check_probability("blur_prob", blur_prob)
        self.blur_sigma = kernels.check_interval("blur_sigma", blur_sigma, positive=True)
        self.blur_kernel = max(2 * ((image_size // 10) // 2) + 1, 3)

    def extra_repr(self) -> str:
        return (
            f"image_size={self.image_size}, crop_scale={self.crop_scale}, crop_ratio={self.crop_ratio}, "
            f"hflip_prob={self.hflip_prob}, strength={self.strength}, jitter_prob={self.jitter_prob}, "
            f"grayscale_prob={self.grayscale_prob}, blur_prob={self.blur_prob}, blur_sigma={self.blur_sigma}"
        )

    def forward(self, x: Tensor, generator: torch.Generator) -> Tensor:
        kernels.check_batch(x, generator)
        b, c, h, w = x.shape
        if c not in (1, 3):
            raise ValueError(f"the simclr views need 1 or 3 channels, got {c}")
        # All draws happen here, in a fixed layout, whatever the channels or device.
        d = kernels.Draws(b, 2 * kernels.CROP_TRIES + 2 + 9, generator)
        cw, ch, cx, cy = kernels.sample_crops(d, self.crop_scale, self.crop_ratio, aspect=h / w)
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
        theta = kernels.affine_theta(cw, ch, cx, cy, flip, zero, zero, zero + 1, zero, zero)
        # Unjittered images have brightness = contrast = sat = 1, hue = 0: exactly no change.
        colour = kernels.colour_matrices(sat, hue) if c == 3 else torch.eye(3).expand(b, 3, 3)
        grey_m = torch.where(grey[:, None, None], torch.tensor(kernels.GRAY).expand(3, 3), torch.eye(3))
        theta_d, bright_d, contrast_d, colour_d, grey_d = kernels.ship_params(x, theta, bright, contrast, colour, grey_m)

        out = kernels.warp(x, theta_d, self.image_size, padding_mode="border")
        if bool(jitter.any()):
            out = kernels.jitter(out, bright_d, contrast_d, colour_d if c == 3 else None)
        if c == 3 and bool(grey.any()):
            # Grey as a matrix (rows = luma weights; identity for the others): one bmm, the
            # same values as torchvision's rgb_to_grayscale and cheaper than it plus a where.
            out = torch.bmm(grey_d, out.reshape(b, 3, -1)).reshape(out.shape)
        if bool(blur.any()):
            # Only the images drawn for blurring: half the work at blur_prob = 0.5.
            idx = blur.nonzero()[:, 0]
            blur_kernels = kernels.gaussian_kernels(sigma[idx], self.blur_kernel).to(x.device, x.dtype)
            if idx.numel() == b:
                out = kernels.blur(out, blur_kernels)
            else:
                idx = idx.to(x.device)
                out = out.index_copy(0, idx, kernels.blur(out.index_select(0, idx), blur_kernels))
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
        self.elastic_prob = kernels.check_probability("elastic_prob", elastic_prob)
        self.elastic = kernels.check_number("elastic", elastic)
        if not 0.0 <= self.elastic <= 0.5:
            raise ConfigError(f"view option elastic must be in [0, 0.5], got {elastic!r}")
        if not isinstance(elastic_grid, int) or elastic_grid < 2:
            raise ConfigError(f"view option elastic_grid must be an integer ≥ 2, got {elastic_grid!r}")
        self.elastic_grid = elastic_grid
        self.rotation = kernels.check_interval("rotation", rotation, symmetric=True)
        self.shear = kernels.check_interval("shear", shear, symmetric=True, low=-80.0, high=80.0)
        self.translate = kernels.check_number("translate", translate)
        if not 0.0 <= self.translate <= 1.0:
            raise ConfigError(f"view option translate must be in [0, 1], got {translate!r}")
        self.scale = kernels.check_interval("scale", scale, positive=True)
        self.crop_scale = kernels.check_interval("crop_scale", crop_scale, high=1.0, positive=True)
        self.crop_ratio = kernels.check_interval("crop_ratio", crop_ratio, positive=True)
        self.hflip_prob = kernels.check_probability("hflip_prob", hflip_prob)
        self.thickness_prob = kernels.check_probability("thickness_prob", thickness_prob)
        self.thickness = kernels.check_probability("thickness", thickness)
        self.erase_prob = kernels.check_probability("erase_prob", erase_prob)
        self.erase_scale = kernels.check_interval("erase_scale", erase_scale, high=1.0, positive=True)
        self.erase_ratio = kernels.check_interval("erase_ratio", erase_ratio, positive=True)

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
        kernels.check_batch(x, generator)
        b, _, h, w = x.shape
        s = self.image_size
        d = kernels.Draws(b, 2 * kernels.CROP_TRIES + 2 + 15, generator)
        cw, ch, cx, cy = kernels.sample_crops(d, self.crop_scale, self.crop_ratio, aspect=h / w)
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

        theta = kernels.affine_theta(cw, ch, cx, cy, flip, angle, shear, zoom, tx, ty)
        offsets = None
        if self.elastic > 0 and self.elastic_prob > 0:
            # Drawn after the uniform block, so the other parameters do not depend on these options.
            strength = torch.where(d.take() < self.elastic_prob, self.elastic, 0.0)
            noise = torch.randn(b, 2, self.elastic_grid, self.elastic_grid, generator=generator, dtype=torch.float64)
            noise_d, strength_d = kernels.ship_params(x, noise, strength)
            offsets = kernels.elastic_offsets(noise_d, s, strength_d)
        theta_d, amount_d = kernels.ship_params(x, theta, amount)
        out = kernels.warp(x, theta_d, s, padding_mode="zeros", offsets=offsets)
        if bool(thick.any()):
            out = kernels.stroke_thickness(out, amount_d)
        if bool(erase.any()):
            boxes = torch.stack([top, left, eh, ew]).to(x.device)
            out = kernels.erase(out, *boxes)
        return out.clamp_(0.0, 1.0)
